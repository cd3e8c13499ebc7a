"""Engine, sessions and schema revision checks.

SQLite runs in WAL mode with foreign keys on and a busy timeout, and every write transaction starts with
``BEGIN IMMEDIATE``: a second writer waits for the lock at BEGIN instead of failing later with "database is locked"
when a read transaction tries to upgrade. PostgreSQL gets the same serialised writers from its own locking: every
write transaction first takes one transaction-scoped advisory lock (``pg_advisory_xact_lock``), waiting at most the
busy timeout, so check-then-insert code (pairs add/replace, domain creation, the revision counter, vector upserts)
cannot race at READ COMMITTED; reads take no lock. Alembic runs from code; a store at another revision is refused
with the command that fixes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy import create_engine, event, exc, select, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from kvdb import lexical
from kvdb.errors import SchemaError, StoreError
from kvdb.store.models import StoreState

log = logging.getLogger(__name__)

# Alembic's scripts: kvdb/migrations is a link to the checkout's top-level migrations/ and a real folder in a
# wheel, so a checkout, an editable install and an installed wheel all run the same scripts from here.
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# The newest migration, so that opening a store at head needs one SELECT and not Alembic's script loader (half a
# second of imports on every command); tests/test_migrations.py checks it against the migrations folder.
SCHEMA_HEAD = "0005"

# Advisory lock keys (any 64-bit constants, the same in every kvdb process): one for writers, one for migrations.
PG_WRITE_LOCK = 0x6B76_6462_7772_6974  # "kvdbwrit"
PG_MIGRATE_LOCK = 0x6B76_6462_6D69_6772  # "kvdbmigr"


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
        lexical.prepare_connection(cur)  # temp tables of the full-text search, for this connection's life
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        mode = conn.get_execution_options().get("kvdb_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _postgres_engine(url: str, busy_timeout_ms: int) -> Engine:
    # Timestamps come back in UTC whatever the server's own time zone is (unless the URL sets its own options).
    own_options = "options" in make_url(url).query
    engine = create_engine(url, pool_pre_ping=True, connect_args={} if own_options else {"options": "-c timezone=UTC"})

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        if conn.get_execution_options().get("kvdb_write"):
            # Serialise writers like SQLite's BEGIN IMMEDIATE: the lock is released at commit or rollback. Waiting
            # longer than the busy timeout fails with "lock timeout", which _translate turns into "stayed locked".
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(busy_timeout_ms)}")
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_WRITE_LOCK})")

    return engine


# SQLSTATE classes and codes of PostgreSQL errors that are the server's condition, not a bug in the calling code.
_PG_STATES = (
    ("08", "connection"), ("28", "auth"), ("3D000", "no_database"), ("53100", "disk_full"), ("53", "resources"),
    ("25006", "read_only"), ("55P03", "locked"), ("57P", "shutdown"), ("42501", "privilege"),
)


def _pg_kind(err: exc.DBAPIError, low: str) -> str | None:
    state = getattr(getattr(err, "orig", None), "sqlstate", None) or ""
    for prefix, kind in _PG_STATES:
        if state.startswith(prefix):
            return kind
    if state:
        return None
    # Errors raised while connecting carry no SQLSTATE: recognise them by their text.
    for needle, kind in (("password authentication failed", "auth"), ("role \"", "auth"),
                         ("no pg_hba.conf entry", "auth"), ("database \"", "no_database"),
                         ("connection refused", "connection"), ("could not translate host name", "connection"),
                         ("connection to server", "connection"), ("timeout expired", "connection"),
                         ("no space left", "disk_full"), ("read-only transaction", "read_only"),
                         ("lock timeout", "locked")):
        if needle in low:
            return kind
    return None


def _translate_pg(err: exc.DBAPIError, where: str, text: str) -> StoreError | None:
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    kind = _pg_kind(err, text.lower())
    if kind is None:
        return None
    if kind == "connection":
        return StoreError(f"cannot connect to the PostgreSQL store at {where} ({first}); check that the server is "
                          "running and the host and port of KVDB_DATABASE_URL")
    if kind == "auth":
        return StoreError(f"PostgreSQL refused the login to {where} ({first}); check the user and password in "
                          "KVDB_DATABASE_URL (or the server's pg_hba.conf)")
    if kind == "no_database":
        return StoreError(f"the PostgreSQL store at {where} cannot be opened ({first}); create it first, e.g. "
                          "`createdb NAME`, then run the command again")
    if kind in ("disk_full", "resources"):
        return StoreError(f"the PostgreSQL server of {where} ran out of space or resources ({first}); the write was "
                          "rolled back and nothing stored before it is lost; free some space and run the command "
                          "again")
    if kind == "read_only":
        return StoreError(f"the store at {where} is read-only ({first}); nothing was changed")
    if kind == "locked":
        return StoreError(f"the store at {where} stayed locked by another writer; try again")
    if kind == "shutdown":
        return StoreError(f"the PostgreSQL server of {where} shut down or ended the connection ({first}); the "
                          "transaction was rolled back; run the command again when it is back")
    return StoreError(f"PostgreSQL denied access to {where} ({first}); grant the user of KVDB_DATABASE_URL the "
                      "rights it needs on the kvdb tables")


def _translate(err: exc.DBAPIError, where: str, backend: str = "sqlite", password: str | None = None) -> StoreError:
    text = str(err.orig) if getattr(err, "orig", None) is not None else str(err)
    if password:
        text = text.replace(password, "***")
    if backend != "sqlite":
        found = _translate_pg(err, where, text)
        if found is not None:
            return found
    if isinstance(err, (exc.IntegrityError, exc.ProgrammingError)):
        raise err  # a constraint or a bug in the calling code: not the store's condition, keep it as it is
    low = text.lower()
    if backend != "sqlite":
        return StoreError(f"the store at {where} failed: {text.strip().splitlines()[0] if text.strip() else text}")
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
        try:
            parsed = make_url(url)
            parsed.port  # noqa: B018 - a port that is not a number fails here, not at connect
        except (exc.ArgumentError, ValueError):
            raise StoreError(f"{url.split('@')[-1]!r} is not a database URL; use sqlite:////path/kvdb.sqlite or "
                             "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB") from None
        self.backend = parsed.get_backend_name()
        self.is_sqlite = self.backend == "sqlite"
        self.is_postgres = self.backend == "postgresql"
        self._password = parsed.password
        self.where = sqlite_path(parsed.database, parsed.query) if self.is_sqlite else \
            parsed.render_as_string(hide_password=True)
        if not (self.is_sqlite or self.is_postgres):
            raise StoreError(f"the store at {self.where}: kvdb supports SQLite and PostgreSQL "
                             f"(postgresql+psycopg://...), not {self.backend}")
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
            try:
                self.engine = _postgres_engine(url, busy_timeout_ms)
            except ImportError as e:
                raise StoreError(f"the store at {self.where} needs the PostgreSQL driver ({e}); install it with "
                                 "`pip install 'kvdb[postgres]'` and use a postgresql+psycopg:// URL") from None
            self._write_engine = self.engine.execution_options(kvdb_write=True)
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)

    # -- sessions ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        try:
            with self._read_sessions() as session:
                yield session
        except exc.DatabaseError as e:  # OperationalError and a damaged file
            raise self._translate(e) from None

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: everything inside is committed together or not at all."""
        try:
            with self._write_sessions() as session, session.begin():
                yield session
        except exc.DatabaseError as e:  # OperationalError and a damaged file
            raise self._translate(e) from None

    @contextlib.contextmanager
    def write_connection(self) -> Iterator[Connection]:
        """A Core connection in one write transaction (the writers' lock taken), committed or rolled back whole."""
        try:
            with self._write_engine.begin() as conn:
                yield conn
        except exc.DatabaseError as e:
            raise self._translate(e) from None

    def _translate(self, err: exc.DBAPIError) -> StoreError:
        return _translate(err, self.where, self.backend, self._password)

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
            raise self._translate(e) from None

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """Serialise first-use migrations between processes (SQLite DDL is not guarded by BEGIN IMMEDIATE here;
        PostgreSQL takes an advisory lock inside the migrating transaction instead, see ``_run_alembic``)."""
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
                if self.is_postgres:  # one migrating process at a time; the others then find the schema current
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATE_LOCK})")
                getattr(command, action)(self.alembic_config(conn), revision)
        except exc.DatabaseError as e:  # OperationalError and a damaged file
            raise self._translate(e) from None

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
                    log.info("creating the store schema at %s (revision %s)", self.where, head)
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
