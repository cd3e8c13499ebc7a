"""Shared fixtures: a temporary KVDB_HOME per test and a CliRunner bound to it."""

from __future__ import annotations

import atexit
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvdb.cli import cli


def pytest_configure(config):
    import torch

    # Tiny models gain nothing from a second thread, and OpenMP's spinning makes them far slower when the other core
    # is busy; one thread keeps the suite's time steady.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    for var in ("KVDB_HOME", "KVDB_CONFIG", "KVDB_DATABASE_URL", "KVDB_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


class Kvdb:
    """Runs `kvdb --home HOME ...` in-process and checks the exit code; with ``database_url`` the store is that
    database (KVDB_DATABASE_URL) instead of HOME/kvdb.sqlite."""

    def __init__(self, home: Path, config: Path | None = None, database_url: str | None = None):
        self.home = home
        self.config = config
        self.database_url = database_url
        self.runner = CliRunner(env={"KVDB_DATABASE_URL": database_url} if database_url else None)

    def __call__(self, *args: str, input: str | bytes | None = None, ok: bool = True):
        base = ["--home", str(self.home)]
        if self.config is not None:
            base += ["--config", str(self.config)]
        result = self.runner.invoke(cli, [*base, *args], input=input)
        if ok and result.exit_code != 0:
            raise AssertionError(f"kvdb {' '.join(args)} failed ({result.exit_code}): {result.output}")
        if not ok:
            assert result.exit_code != 0, f"kvdb {' '.join(args)} should have failed: {result.output}"
        return result

    def json(self, *args: str, input: str | None = None):
        return json.loads(self(*args, "--json", input=input).stdout)

    def count(self) -> int:
        """Pairs in the store, read straight from SQLite or psycopg (independent of the code under test)."""
        if self.database_url:
            import psycopg
            from sqlalchemy.engine import make_url

            u = make_url(self.database_url)
            with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database) as conn:
                if conn.execute("select to_regclass('pairs')").fetchone()[0] is None:
                    return 0  # never opened: no schema yet, as no SQLite file
                return conn.execute("select count(*) from pairs").fetchone()[0]
        db = self.home / "kvdb.sqlite"
        if not db.exists():
            return 0
        with sqlite3.connect(db) as conn:
            return conn.execute("select count(*) from pairs").fetchone()[0]


@pytest.fixture
def kv(home) -> Kvdb:
    return Kvdb(home)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# -- PostgreSQL (tests/pgserver.py): one server per session, one fresh database per test -------------------------
@pytest.fixture(scope="session")
def pg_server():
    from tests.pgserver import PgServer, why_unavailable

    reason = why_unavailable()
    if reason is not None:
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    server = PgServer()
    atexit.register(server.stop)  # also when the session dies before its teardown (stop is idempotent)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A postgresql+psycopg:// URL of a new, empty database, dropped after the test."""
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)


@pytest.fixture
def pg_kv(home, pg_url) -> Kvdb:
    return Kvdb(home, database_url=pg_url)
