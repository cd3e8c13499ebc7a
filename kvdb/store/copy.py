"""`kvdb db copy`: the whole store into another, empty database (SQLite -> PostgreSQL, PostgreSQL -> SQLite, ...).

Every table of the schema is copied with its primary keys (pair ids are the FAISS ids, so an index built on the
source stays valid for the copy), parents before children. The source is read from one snapshot (a single read
transaction; REPEATABLE READ on PostgreSQL) a chunk of rows at a time in primary-key order, so memory stays bounded
however large the blobs are; the target is written in one transaction, so an interrupted or failed copy leaves it
empty. The target's schema is created (or checked) by the same Alembic migrations first. A target that already holds
rows, or that is the source itself, is refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, Integer, LargeBinary, Table, exc, func, insert, select, text
from sqlalchemy.engine import Connection, make_url

from kvdb.errors import ConflictError, StoreError, ValidationError
from kvdb.store.db import Store
from kvdb.store.models import Base, Pair

ROWS_PER_CHUNK = 1000
BLOB_ROWS_PER_CHUNK = 32  # a vectors blob is up to a few MB: 32 of them bound the memory of one chunk


@dataclass
class CopyReport:
    source: str
    target: str
    tables: dict[str, int] = field(default_factory=dict)  # rows copied per table, in copy order

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "tables": dict(self.tables),
                "rows": sum(self.tables.values())}


def tables() -> list[Table]:
    """Every table of the schema, parents before children."""
    return list(Base.metadata.sorted_tables)


def same_database(a: Store, b: Store) -> bool:
    if a.backend != b.backend:
        return False
    if a.is_sqlite:
        if not a.where or not b.where or ":memory:" in (a.where, b.where):
            return False
        return os.path.realpath(a.where) == os.path.realpath(b.where)
    ua, ub = make_url(a.url), make_url(b.url)
    key = lambda u: ((u.host or "localhost").lower(), u.port or 5432, u.database)  # noqa: E731
    return key(ua) == key(ub)


@contextlib.contextmanager
def _snapshot(store: Store) -> Iterator[Connection]:
    """One read transaction on the source: every chunk comes from the same state of the store. Its errors name the
    source (the target's name the target)."""
    try:
        conn = store.engine.connect()
        if store.is_postgres:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        trans = conn.begin()
    except exc.DatabaseError as e:
        raise store._translate(e) from None
    try:
        yield conn
    finally:
        trans.rollback()  # it only read
        conn.close()


def _utc(value: Any) -> Any:
    """Timestamps as aware UTC: SQLite keeps them naive (written in UTC), PostgreSQL aware."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    return value


def _chunks(source: Store, conn: Connection, table: Table) -> Iterator[list[dict[str, Any]]]:
    (pk,) = table.primary_key.columns  # every kvdb table has a one-column key
    size = BLOB_ROWS_PER_CHUNK if any(isinstance(c.type, LargeBinary) for c in table.columns) else ROWS_PER_CHUNK
    stamps = [c.name for c in table.columns if isinstance(c.type, DateTime)]
    last = None
    while True:
        query = select(table).order_by(pk).limit(size)
        if last is not None:
            query = query.where(pk > last)
        try:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        except exc.DatabaseError as e:
            raise source._translate(e) from None
        if not rows:
            return
        for row in rows:
            for name in stamps:
                row[name] = _utc(row[name])
        yield rows
        last = rows[-1][pk.name]


def _occupied(conn: Connection) -> dict[str, int]:
    counts = {t.name: conn.scalar(select(func.count()).select_from(t)) or 0 for t in tables()}
    return {name: n for name, n in counts.items() if n}


def _reset_sequences(conn: Connection) -> None:
    """PostgreSQL hands out SERIAL ids from a sequence that explicit ids do not move: start each after the copy's
    largest id, so the next pair added gets a new id (and a new FAISS id)."""
    for table in tables():
        (pk,) = table.primary_key.columns
        if not isinstance(pk.type, Integer):
            continue
        seq = conn.scalar(text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": pk.name})
        if seq:
            conn.execute(text(f'SELECT setval(:seq, COALESCE((SELECT MAX("{pk.name}") FROM "{table.name}"), 0) + 1, '
                              'false)'), {"seq": seq})


def copy_store(source: Store, target_url: str, busy_timeout_ms: int = 60_000) -> CopyReport:
    """Copy every row of ``source`` into the empty store at ``target_url`` (created and migrated if new)."""
    if "://" not in target_url:
        raise ValidationError(f"--to {target_url!r} is not a database URL; give e.g. sqlite:////abs/path/kvdb.sqlite "
                              "or postgresql+psycopg://USER@HOST:PORT/DB")
    target = Store(target_url, busy_timeout_ms=busy_timeout_ms)
    try:
        if same_database(source, target):
            raise ValidationError(f"the target {target.where} is the source store itself; copy into another "
                                  "database")
        target.ensure_schema()  # a new target is created and migrated; one at another revision is refused
        if target.current_revision() != source.current_revision():
            raise StoreError(f"the target {target.where} is at schema revision {target.current_revision()}, the "
                             f"source at {source.current_revision()}; run `kvdb db upgrade` on the older one")
        report = CopyReport(source=source.where, target=target.where)
        with target.write_connection() as tconn:  # one transaction: all rows or none
            occupied = _occupied(tconn)
            if occupied:
                pairs = occupied.get(Pair.__tablename__, 0)
                what = f"{pairs} pair(s)" if pairs else \
                    "rows (" + ", ".join(f"{n} in {name}" for name, n in occupied.items()) + ")"
                raise ConflictError(f"the target {target.where} already holds {what}; copy into a new, empty "
                                    "database (nothing was copied)")
            with _snapshot(source) as sconn:
                for table in tables():
                    n = 0
                    for rows in _chunks(source, sconn, table):
                        tconn.execute(insert(table), rows)
                        n += len(rows)
                    report.tables[table.name] = n
            if target.is_postgres:
                _reset_sequences(tconn)
        return report
    finally:
        target.dispose()
