"""The base model's recorded answers to rephrasings, in the store instead of a JSON file under checkpoints/.

An existing answer file is imported by kvdb.recorded the first time a home's answers are read or written (the
migration runs against a database URL and does not know the home's folder), then renamed to ``*.imported``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('recorded_answers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('prompt_key', sa.String(length=64), nullable=False),
    sa.Column('prompt_format', sa.String(length=64), nullable=False),
    sa.Column('pair_hash', sa.String(length=64), nullable=True),
    sa.Column('max_new_tokens', sa.Integer(), nullable=False),
    sa.Column('finished', sa.Boolean(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_recorded_answers')),
    sa.UniqueConstraint('fingerprint', 'prompt_key', name='uq_recorded_answers_key')
    )
    with op.batch_alter_table('recorded_answers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_recorded_answers_pair_hash'), ['pair_hash'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('recorded_answers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_recorded_answers_pair_hash'))

    op.drop_table('recorded_answers')
