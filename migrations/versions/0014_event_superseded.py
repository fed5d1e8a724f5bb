"""job_events.superseded: metrics of steps a later attempt trained again, kept for cursors and listed no more

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 12:00:00

A boolean, false for every earlier event.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('job_events') as batch:
        batch.add_column(sa.Column('superseded', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('job_events') as batch:
        batch.drop_column('superseded')
