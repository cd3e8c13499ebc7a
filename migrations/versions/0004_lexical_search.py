"""Lexical search over the pairs: an FTS5 table kept in step by triggers on SQLite, a GIN expression index on
PostgreSQL.

SQLite: ``pairs_fts`` (question, answer, variants) with rowid = pair id, filled from the existing pairs here and kept
in step by triggers on ``pairs``, so every write path (add, replace, remove, import, ``db copy``) updates it in the
writing transaction. PostgreSQL: a GIN index over the same text as a ``to_tsvector`` expression, which the server
keeps in step itself. The table and index live outside the ORM metadata (kvdb.lexical owns their SQL), so
``db copy`` does not copy them: the target's own triggers fill its table. A later SQLite migration that rebuilds
``pairs`` by copy-and-move (batch mode) drops these triggers with the old table and must create them again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""
from alembic import op

from kvdb.lexical import PG_INDEX_SQL, PG_INDEX, SQLITE_FILL, SQLITE_SCHEMA, SQLITE_DROP

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in SQLITE_SCHEMA + [SQLITE_FILL]:
            op.execute(statement)
    else:
        op.execute(PG_INDEX_SQL)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in SQLITE_DROP:
            op.execute(statement)
    else:
        op.execute(f"DROP INDEX IF EXISTS {PG_INDEX}")
