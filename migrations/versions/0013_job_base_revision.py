"""fine_tuning_jobs.base_revision: the registration (source@commit) of the base model a job trains on

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 11:00:00

A nullable column; earlier jobs' fine-tuned models are not checked against their base's registration.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs') as batch:
        # source (1024) + "@" + commit_sha (64): app/models/registered_model.py's BASE_REVISION_LENGTH
        batch.add_column(sa.Column('base_revision', sa.String(length=1089), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs') as batch:
        batch.drop_column('base_revision')
