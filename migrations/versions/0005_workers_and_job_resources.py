"""workers registry; job resources, priority and dispatch queue

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 04:16:40

Backward compatible: new columns are nullable or have a server default, so workers and APIs of the
previous release keep running against the upgraded schema (their jobs need nothing and run anywhere).
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('labels', JSON, nullable=False),
    sa.Column('gpus', sa.Integer(), nullable=False),
    sa.Column('gpu_memory_gb', sa.Double(), nullable=True),
    sa.Column('gpu_names', JSON, nullable=False),
    sa.Column('cpu_count', sa.Integer(), nullable=False),
    sa.Column('memory_gb', sa.Double(), nullable=True),
    sa.Column('queue', sa.String(length=255), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('started_at', sa.Double(), nullable=False),
    sa.Column('heartbeat_at', sa.Double(), nullable=False),
    sa.Column('current_job_id', sa.String(length=64), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('pk', BIGINT, autoincrement=True, nullable=False),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_workers')),
    sa.UniqueConstraint('name', name=op.f('uq_workers_name'))
    )
    with op.batch_alter_table('fine_tuning_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dispatch_queue', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('resources', JSON, nullable=True))
        batch_op.add_column(sa.Column('priority', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs', schema=None) as batch_op:
        batch_op.drop_column('priority')
        batch_op.drop_column('resources')
        batch_op.drop_column('dispatch_queue')
    op.drop_table('workers')
