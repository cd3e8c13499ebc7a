"""Alembic from code: empty -> head, downgrade/upgrade round trip, refusal of an old store, models == migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from kvdb.errors import SchemaError
from kvdb.lexical import in_orm_schema
from kvdb.store.db import MIGRATIONS_DIR, SCHEMA_HEAD, Store
from kvdb.store.models import Base
from tests.conftest import Kvdb


def _tables(db) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}


def test_new_home_is_created_and_migrated_on_first_use(kv: Kvdb):
    assert not kv.home.exists()
    assert kv.json("list") == []
    assert {"pairs", "domains", "pair_vectors", "embeddings", "base_answers", "models", "recorded_answers", "engine_answers"} <= _tables(kv.home / "kvdb.sqlite")
    status = kv.json("db", "status")
    assert status["current"] == status["head"] == "0005" and status["up_to_date"]


def test_sqlite_pragmas(kv: Kvdb, home):
    kv("init")
    store = Store(f"sqlite:///{home}/kvdb.sqlite")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60000


def test_downgrade_upgrade_round_trip_keeps_pairs(kv: Kvdb):
    kv("add", "-d", "cs", "-q", "What is a tree?", "-a", "A connected acyclic graph.")
    kv("db", "downgrade", "0001")
    assert "pair_vectors" not in _tables(kv.home / "kvdb.sqlite")
    res = kv("list", ok=False)
    assert "run `kvdb db upgrade`" in res.stderr and "0001" in res.stderr
    kv("db", "upgrade")
    assert [r["question"] for r in kv.json("list")] == ["What is a tree?"]
    kv("db", "downgrade", "base")
    assert _tables(kv.home / "kvdb.sqlite") == {"alembic_version"}
    kv("db", "upgrade")
    assert kv.json("db", "status")["up_to_date"]


def test_unknown_revision_is_refused(kv: Kvdb):
    kv("init")
    with sqlite3.connect(kv.home / "kvdb.sqlite") as conn:
        conn.execute("update alembic_version set version_num='9999'")
    assert "newer kvdb" in kv("list", ok=False).stderr


def test_models_match_migrations(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/m.sqlite")
    store.upgrade()
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"include_name": in_orm_schema}), Base.metadata)
        tables = {r[0] for r in conn.exec_driver_sql("select name from sqlite_master where type='table'")}
    assert diff == []
    assert "pairs_fts" in tables  # left out of the comparison, not missing


def test_migrations_live_in_the_package():
    """kvdb/migrations is a link to the top-level migrations/ (one source) that a wheel carries as a real folder;
    tests/test_wheel.py runs them from an installed wheel."""
    import kvdb

    package = Path(kvdb.__file__).resolve().parent
    assert MIGRATIONS_DIR == package / "migrations"
    assert MIGRATIONS_DIR.resolve() == (package.parent / "migrations").resolve()
    assert (MIGRATIONS_DIR / "env.py").is_file() and list((MIGRATIONS_DIR / "versions").glob("0001_*.py"))


def test_schema_head_constant_is_the_newest_migration(tmp_path):
    """Opening a store at head skips Alembic's script loader by comparing with SCHEMA_HEAD: it must be the head."""
    store = Store(f"sqlite:///{tmp_path}/h.sqlite")
    assert SCHEMA_HEAD == store.head_revision()
    store.upgrade("0001")
    assert store._stored_revision() == "0001"
    with pytest.raises(SchemaError, match="kvdb db upgrade"):  # an older store still gets the upgrade message
        store.ensure_schema()
    store.upgrade()
    store.ensure_schema()
    assert store._stored_revision() == SCHEMA_HEAD
