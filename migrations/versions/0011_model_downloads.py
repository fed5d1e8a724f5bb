"""model downloads: a registered model's download in progress and the worker hosts holding a verified copy

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 23:20:00

Two nullable/defaulted columns on registered_models; hub models registered before this stay `ready`.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('registered_models') as batch:
        batch.add_column(sa.Column('download', JSON, nullable=True))
        batch.add_column(sa.Column('hosts', JSON, nullable=False, server_default='[]'))


def downgrade() -> None:
    with op.batch_alter_table('registered_models') as batch:
        batch.drop_column('hosts')
        batch.drop_column('download')
