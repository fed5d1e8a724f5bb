"""fine_tuning_jobs.decided_by_partial_count: settings "auto" decided from the first bytes of a training file too
large to validate during upload, decided again from the whole file's count in validating_files

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 10:00:00

A nullable column; earlier jobs keep the settings creation decided.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs') as batch:
        batch.add_column(sa.Column('decided_by_partial_count', JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs') as batch:
        batch.drop_column('decided_by_partial_count')
