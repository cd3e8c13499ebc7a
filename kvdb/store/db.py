"""Engine, sessions and schema revision checks.

SQLite runs in WAL mode with foreign keys on and a busy timeout, and every write transaction starts with
``BEGIN IMMEDIATE``: a second writer waits for the lock at BEGIN instead of failing later with "database is locked"
when a read transaction tries to upgrade. Alembic runs from code; a store at another revision is refused with the
command that fixes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy import create_engine, event, exc, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from kvdb.errors import SchemaError, StoreError
from kvdb.store.models import StoreState

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "migrations"
# The newest migration, so that opening a store at head needs one SELECT and not Alembic's script loader (half a
# second of imports on every command); tests/test_migrations.py checks it against the migrations folder.
SCHEMA_HEAD = "0002"


def _sqlite_engine(url: str, busy_timeout_ms: int) -> Engine:
    engine = create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself instead of pysqlite's implicit, deferred one.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys = ON")
        try:
            cur.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            pass  # a read-only home cannot switch modes; reads still work
        cur.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        mode = conn.get_execution_options().get("kvdb_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _translate(err: exc.DBAPIError, where: str) -> StoreError:
    if isinstance(err, (exc.IntegrityError, exc.ProgrammingError)):
        raise err  # a constraint or a bug in the calling code: not the store's condition, keep it as it is
    text = str(err.orig) if getattr(err, "orig", None) is not None else str(err)
    low = text.lower()
    if "not a database" in low or "malformed" in low:
        return StoreError(f"the store at {where} is damaged ({text.strip().splitlines()[0]}); run `kvdb doctor`, "
                          "then restore a backup or recover it with `sqlite3 kvdb.sqlite .recover`")
    if "readonly" in low or "read-only" in low:
        return StoreError(f"the store at {where} is read-only; nothing was changed")
    if "disk is full" in low or "file too large" in low or "disk i/o error" in low:
        # SQLite reports ENOSPC as "database or disk is full", a file-size limit (EFBIG) as "disk I/O error".
        return StoreError(f"disk full or file too large while writing the store at {where} (SQLite: {text}); the "
                          "write was rolled back and nothing stored before it is lost; free some space (or check the "
                          "disk) and run the command again")
    if "locked" in low or "busy" in low:
        return StoreError(f"the store at {where} stayed locked by another process; try again")
    if "unable to open" in low:
        folder = Path(where).parent if where else None
        if folder is not None and folder.is_dir() and not os.access(folder, os.W_OK):
            return StoreError(f"cannot open the store at {where}: its folder {folder} is read-only, and SQLite "
                              "writes a lock file (-shm) beside the store even to read it; make the folder writable")
        return StoreError(f"cannot open the store at {where}; check the path and its permissions")
    return StoreError(f"the store at {where} failed: {text}")


def sqlite_path(database: str | None, query: dict) -> str | None:
    """The file path of a SQLite URL's database: ``file:`` URIs (``?uri=true``, e.g. ``mode=ro``) name it after
    the scheme and before their own parameters."""
    if database and database.startswith("file:") and str(query.get("uri", "")).lower() in ("true", "1"):
        return unquote(urlsplit(database).path)
    return database


class Store:
    """A handle on one database. ``read()`` and ``write()`` give sessions; ``write()`` commits or rolls back whole."""

    def __init__(self, url: str, busy_timeout_ms: int = 60_000):
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.where = sqlite_path(parsed.database, parsed.query) if self.is_sqlite else \
            parsed.render_as_string(hide_password=True)
        if self.is_sqlite:
            if self.where and self.where != ":memory:" and parsed.query.get("mode") != "ro":
                path = Path(self.where)
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise StoreError(f"cannot create the home folder {path.parent}: {e.strerror}") from None
            self.engine = _sqlite_engine(url, busy_timeout_ms)
            self._write_engine = self.engine.execution_options(kvdb_begin="IMMEDIATE")
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
            self._write_engine = self.engine
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)

    # -- sessions ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        try:
            with self._read_sessions() as session:
                yield session
        except exc.DatabaseError as e:  # OperationalError and a damaged file
            raise _translate(e, self.where) from None

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: everything inside is committed together or not at all."""
        try:
            with self._write_sessions() as session, session.begin():
                yield session
        except exc.DatabaseError as e:  # OperationalError and a damaged file
            raise _translate(e, self.where) from None

    def bump_revision(self, session: Session) -> None:
        """Mark the searchable content changed (pairs or embeddings); called inside the writing transaction."""
        done = session.execute(
            update(StoreState).where(StoreState.key == "revision").values(value=StoreState.value + 1)
        )
        if done.rowcount == 0:
            session.add(StoreState(key="revision", value=1))

    def revision(self, session: Session) -> int:
        return session.scalar(select(StoreState.value).where(StoreState.key == "revision")) or 0

    def dispose(self) -> None:
        self.engine.dispose()

    # -- schema -----------------------------------------------------------------------------------------------
    def alembic_config(self, connection=None):
        from alembic.config import Config as AlembicConfig

        if not (MIGRATIONS_DIR / "env.py").exists():
            raise SchemaError(f"the migrations folder {MIGRATIONS_DIR} is missing; reinstall kvdb")
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        cfg.attributes["connection"] = connection
        return cfg

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self.alembic_config()).get_current_head()

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        try:
            with self.engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except exc.DatabaseError as e:  # OperationalError and a damaged file
            raise _translate(e, self.where) from None

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """Serialise first-use migrations between processes (SQLite DDL is not guarded by BEGIN IMMEDIATE here)."""
        if not self.is_sqlite or not self.where or self.where == ":memory:":
            yield
            return
        lock_path = Path(self.where).with_suffix(".migrate.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield  # read-only home: nothing can be migrated anyway; the check below reports it
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _run_alembic(self, action: str, revision: str) -> None:
        from alembic import command

        try:
            with self.engine.begin() as conn:
                getattr(command, action)(self.alembic_config(conn), revision)
        except exc.DatabaseError as e:  # OperationalError and a damaged file
            raise _translate(e, self.where) from None

    def upgrade(self, revision: str = "head") -> None:
        with self._migration_lock():
            self._run_alembic("upgrade", revision)

    def downgrade(self, revision: str) -> None:
        with self._migration_lock():
            self._run_alembic("downgrade", revision)

    def _stored_revision(self) -> str | None:
        """The revision in alembic_version read with one query; ``None`` where the table is missing or unreadable
        (the Alembic path below then decides what that means)."""
        try:
            with self.engine.connect() as conn:
                rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
        except exc.DBAPIError:
            return None
        return rows[0][0] if len(rows) == 1 else None

    def ensure_schema(self) -> None:
        """Create and migrate a new store; refuse one at another revision with the command that fixes it."""
        if self._stored_revision() == SCHEMA_HEAD:
            return
        head = self.head_revision()
        current = self.current_revision()
        if current == head:
            return
        if current is None:
            with self._migration_lock():
                if self.current_revision() is None:  # another process may have migrated while we waited
                    self._run_alembic("upgrade", "head")
            return
        from alembic.script import ScriptDirectory

        known = {s.revision for s in ScriptDirectory.from_config(self.alembic_config()).walk_revisions()}
        if current not in known:
            raise SchemaError(
                f"the store at {self.where} is at schema revision {current}, which this kvdb does not know "
                "(made by a newer kvdb?); upgrade kvdb"
            )
        raise SchemaError(
            f"the store at {self.where} is at schema revision {current}, this kvdb needs {head}; "
            "run `kvdb db upgrade`"
        )


def open_store(url: str, busy_timeout_ms: int = 60_000, migrate: bool = True) -> Store:
    store = Store(url, busy_timeout_ms=busy_timeout_ms)
    if migrate:
        store.ensure_schema()
    return store
