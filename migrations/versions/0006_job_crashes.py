"""job crash count: consecutive crashes without progress

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 18:00:00

Backward compatible: the column has a server default. A job's `attempt` keeps counting every claim; `crashes`
counts only the attempts that died since the job last registered a checkpoint, and it alone decides when a
job gives up (Settings.max_attempts).
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs') as batch_op:
        batch_op.add_column(sa.Column('crashes', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs') as batch_op:
        batch_op.drop_column('crashes')
