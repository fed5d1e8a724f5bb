"""registered base models: the model registry (hub ids pinned to a commit, or local paths)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 09:00:00

A new table; nothing else changes. The JSON catalogue (file or TUNEFORGE_MODEL_CATALOGUE) is imported into
it as `path:` models the first time a process looks a model up.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), 'postgresql')


def upgrade() -> None:
    op.create_table(
        'registered_models',
        sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('source', sa.String(length=1024), nullable=False),
        sa.Column('revision', sa.String(length=255), nullable=True),
        sa.Column('commit_sha', sa.String(length=64), nullable=True),
        sa.Column('trust_remote_code', sa.Boolean(), nullable=False),
        sa.Column('allow_pickle', sa.Boolean(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('info', JSON, nullable=False),
        sa.Column('files', JSON, nullable=False),
        sa.Column('tokenizer', JSON, nullable=False),
        sa.Column('owned_by', sa.String(length=255), nullable=False),
        sa.Column('created_at', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('pk', name=op.f('pk_registered_models')),
        sa.UniqueConstraint('name', name=op.f('uq_registered_models_name')),
    )


def downgrade() -> None:
    op.drop_table('registered_models')
