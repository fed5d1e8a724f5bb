"""inference servers: where the API finds the processes that serve chat completions

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 20:30:00

A new table, written only by `tuneforge worker --inference` processes; nothing else changes.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), 'postgresql')


def upgrade() -> None:
    op.create_table(
        'inference_servers',
        sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('hostname', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('url', sa.String(length=1024), nullable=False),
        sa.Column('token', sa.String(length=64), nullable=False),
        sa.Column('device', sa.String(length=64), nullable=False),
        sa.Column('loaded', JSON, nullable=False),
        sa.Column('queued', sa.Integer(), nullable=False),
        sa.Column('started_at', sa.Double(), nullable=False),
        sa.Column('heartbeat_at', sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint('pk', name=op.f('pk_inference_servers')),
        sa.UniqueConstraint('name', name=op.f('uq_inference_servers_name')),
    )


def downgrade() -> None:
    op.drop_table('inference_servers')
