"""webhooks: endpoints per project and their deliveries

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-28 01:30:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
# The highest revision when this file was written; whoever merges 0002/0003 chains this after them.
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('webhook_endpoints',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('project_pk', BIGINT, nullable=False),
    sa.Column('url', sa.String(length=2048), nullable=False),
    sa.Column('secret', sa.String(length=128), nullable=False),
    sa.Column('event_types', JSON, nullable=False),
    sa.Column('created_at', sa.Integer(), nullable=False),
    sa.Column('pk', BIGINT, autoincrement=True, nullable=False),
    sa.ForeignKeyConstraint(['project_pk'], ['projects.pk'], name=op.f('fk_webhook_endpoints_project_pk_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_webhook_endpoints')),
    sa.UniqueConstraint('id', name=op.f('uq_webhook_endpoints_id'))
    )
    op.create_index('ix_webhook_endpoints_project_pk_pk', 'webhook_endpoints', ['project_pk', 'pk'], unique=False)
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('endpoint_pk', BIGINT, nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('event_type', sa.String(length=64), nullable=False),
    sa.Column('payload', JSON, nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.Double(), nullable=False),
    sa.Column('last_status_code', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.Column('created_at', sa.Integer(), nullable=False),
    sa.Column('delivered_at', sa.Integer(), nullable=True),
    sa.Column('pk', BIGINT, autoincrement=True, nullable=False),
    sa.ForeignKeyConstraint(['endpoint_pk'], ['webhook_endpoints.pk'], name=op.f('fk_webhook_deliveries_endpoint_pk_webhook_endpoints'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_webhook_deliveries')),
    sa.UniqueConstraint('id', name=op.f('uq_webhook_deliveries_id'))
    )
    op.create_index('ix_webhook_deliveries_status_next_attempt_at', 'webhook_deliveries', ['status', 'next_attempt_at'], unique=False)
    op.create_index('ix_webhook_deliveries_endpoint_pk_pk', 'webhook_deliveries', ['endpoint_pk', 'pk'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_webhook_deliveries_endpoint_pk_pk', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_status_next_attempt_at', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index('ix_webhook_endpoints_project_pk_pk', table_name='webhook_endpoints')
    op.drop_table('webhook_endpoints')
