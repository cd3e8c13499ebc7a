"""Engines' whole greedy answers to exact prompts, replayed for a token-identical prompt on the same engine.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('engine_answers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('engine_key', sa.String(length=64), nullable=False),
    sa.Column('prompt_key', sa.String(length=64), nullable=False),
    sa.Column('max_new_tokens', sa.Integer(), nullable=False),
    sa.Column('finished', sa.Boolean(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_engine_answers')),
    sa.UniqueConstraint('engine_key', 'prompt_key', name='uq_engine_answers_key')
    )
    with op.batch_alter_table('engine_answers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_engine_answers_engine_key'), ['engine_key'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('engine_answers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_engine_answers_engine_key'))

    op.drop_table('engine_answers')
