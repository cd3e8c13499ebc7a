"""The knowledge store: SQLite (or PostgreSQL) through SQLAlchemy, migrated by Alembic."""

from kvdb.store.db import Store, open_store

__all__ = ["Store", "open_store"]
