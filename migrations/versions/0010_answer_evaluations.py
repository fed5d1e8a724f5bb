"""answer evaluations: base-vs-tuned answer reports asked for after training

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 21:10:00

A new table; nothing else changes.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), 'postgresql')
KEY = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'answer_evaluations',
        sa.Column('pk', KEY, autoincrement=True, nullable=False),
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('job_pk', KEY, nullable=False),
        sa.Column('project_pk', KEY, nullable=False),
        sa.Column('model', sa.String(length=255), nullable=False),
        sa.Column('file_id', sa.String(length=64), nullable=False),
        sa.Column('max_examples', sa.Integer(), nullable=False),
        sa.Column('max_new_tokens', sa.Integer(), nullable=True),
        sa.Column('target', JSON, nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('server', sa.String(length=255), nullable=True),
        sa.Column('report', JSON, nullable=True),
        sa.Column('result_files', JSON, nullable=False),
        sa.Column('error', JSON, nullable=True),
        sa.Column('created_at', sa.Integer(), nullable=False),
        sa.Column('finished_at', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['job_pk'], ['fine_tuning_jobs.pk'],
                                name=op.f('fk_answer_evaluations_job_pk_fine_tuning_jobs'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['project_pk'], ['projects.pk'],
                                name=op.f('fk_answer_evaluations_project_pk_projects'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('pk', name=op.f('pk_answer_evaluations')),
        sa.UniqueConstraint('id', name=op.f('uq_answer_evaluations_id')),
    )
    op.create_index(op.f('ix_answer_evaluations_job_pk'), 'answer_evaluations', ['job_pk'])


def downgrade() -> None:
    op.drop_index(op.f('ix_answer_evaluations_job_pk'), table_name='answer_evaluations')
    op.drop_table('answer_evaluations')
