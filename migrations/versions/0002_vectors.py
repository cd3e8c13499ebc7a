"""Build products keyed by pair hash and model fingerprint: models, per-token vectors, embeddings, base-model answers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('models',
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('hidden_size', sa.Integer(), nullable=False),
    sa.Column('num_layers', sa.Integer(), nullable=False),
    sa.Column('info', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('fingerprint', name=op.f('pk_models'))
    )

    op.create_table('base_answers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pair_hash', sa.String(length=64), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('prompt_format', sa.String(length=64), nullable=False),
    sa.Column('max_new_tokens', sa.Integer(), nullable=False),
    sa.Column('finished', sa.Boolean(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['fingerprint'], ['models.fingerprint'], name=op.f('fk_base_answers_fingerprint_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['pair_hash'], ['pairs.hash'], name=op.f('fk_base_answers_pair_hash_pairs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_base_answers')),
    sa.UniqueConstraint('pair_hash', 'fingerprint', 'prompt_format', name='uq_base_answers_key')
    )
    with op.batch_alter_table('base_answers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_base_answers_pair_hash'), ['pair_hash'], unique=False)

    op.create_table('embeddings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pair_hash', sa.String(length=64), nullable=False),
    sa.Column('embedder', sa.String(length=128), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['pair_hash'], ['pairs.hash'], name=op.f('fk_embeddings_pair_hash_pairs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_embeddings')),
    sa.UniqueConstraint('pair_hash', 'embedder', name='uq_embeddings_pair_embedder')
    )
    with op.batch_alter_table('embeddings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_embeddings_embedder'), ['embedder'], unique=False)
        batch_op.create_index(batch_op.f('ix_embeddings_pair_hash'), ['pair_hash'], unique=False)

    op.create_table('pair_vectors',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pair_hash', sa.String(length=64), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('layers', sa.JSON(), nullable=False),
    sa.Column('num_tokens', sa.Integer(), nullable=False),
    sa.Column('answer_start', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['fingerprint'], ['models.fingerprint'], name=op.f('fk_pair_vectors_fingerprint_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['pair_hash'], ['pairs.hash'], name=op.f('fk_pair_vectors_pair_hash_pairs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pair_vectors')),
    sa.UniqueConstraint('pair_hash', 'fingerprint', name='uq_pair_vectors_pair_model')
    )
    with op.batch_alter_table('pair_vectors', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pair_vectors_fingerprint'), ['fingerprint'], unique=False)
        batch_op.create_index(batch_op.f('ix_pair_vectors_pair_hash'), ['pair_hash'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('pair_vectors', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pair_vectors_pair_hash'))
        batch_op.drop_index(batch_op.f('ix_pair_vectors_fingerprint'))

    op.drop_table('pair_vectors')
    with op.batch_alter_table('embeddings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_embeddings_pair_hash'))
        batch_op.drop_index(batch_op.f('ix_embeddings_embedder'))

    op.drop_table('embeddings')
    with op.batch_alter_table('base_answers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_base_answers_pair_hash'))

    op.drop_table('base_answers')
    op.drop_table('models')
