"""The store on a real PostgreSQL server (tests/pgserver.py: started on loopback in a temporary folder, one fresh
database per test): the pairs CLI tests run again through KVDB_DATABASE_URL, then build / query / export / import,
migrations, doctor and stats, server errors as one-line messages, writers serialised by the advisory lock (threads
and concurrent processes), and `kvdb db copy` SQLite -> PostgreSQL -> SQLite with identical rows, query results and
export bytes. Skipped, with the reason, only where PostgreSQL cannot be installed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import timezone
from pathlib import Path

import pytest
from sqlalchemy import select

import tests.test_pairs_cli as pairs_cli
from kvdb.errors import StoreError
from kvdb.store.db import PG_WRITE_LOCK, SCHEMA_HEAD, Store, open_store
from kvdb.store.models import Base
from tests.conftest import Kvdb, write_jsonl
from tests.reliability import REPO, kvdb_env, pair_file
from tests.test_build_query import PAIRS, tiny_config  # noqa: F401 - the tiny-model config fixture, reused


def _dbname(url: str) -> str:
    return url.rsplit("/", 1)[-1]


# -- the pairs CLI tests, run again on PostgreSQL -------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "test_add_single_and_list_json_fields",
    "test_file_jsonl_keeps_unknown_fields_and_skips_identical",
    "test_file_csv_and_stdin",
    "test_conflicting_answer_needs_replace",
    "test_show_prefix_unknown_and_ambiguous",
    "test_remove_by_hash_and_domain_all_or_nothing",
    "test_domains_and_stats",
    "test_csv_without_columns_and_missing_file",
])
def test_pairs_cli_on_postgres(pg_kv: Kvdb, tmp_path, name):
    test = getattr(pairs_cli, name)
    args = {"kv": pg_kv, "tmp_path": tmp_path}
    test(**{k: v for k, v in args.items() if k in test.__code__.co_varnames[:test.__code__.co_argcount]})


@pytest.mark.parametrize("text", pairs_cli.WEIRD)
def test_text_round_trips_on_postgres(pg_kv: Kvdb, text):
    pairs_cli.test_text_round_trips_byte_for_byte(pg_kv, text)


@pytest.mark.parametrize("case", ["malformed_jsonl", "bad_domain", "huge_metadata"])
def test_bad_file_changes_nothing_on_postgres(pg_kv: Kvdb, tmp_path, case):
    pairs_cli.test_bad_file_changes_nothing(pg_kv, tmp_path, case)


def test_stats_report_the_server_database_size(pg_kv: Kvdb):
    pg_kv("add", "-d", "cs", "-q", "What is a stack?", "-a", "A LIFO structure.")
    stats = pg_kv.json("stats")
    assert stats["backend"] == "postgresql" and stats["database_bytes"] > 1_000_000  # an empty PG database is ~7 MB
    assert stats["pairs"] == 1 and stats["store_revision"] == 1 and "kvdb@127.0.0.1" in stats["database"]
    assert f"bytes (postgresql), schema {SCHEMA_HEAD}" in pg_kv("stats").stdout


# -- migrations ------------------------------------------------------------------------------------------------------
def _pg_tables(pg_server, url: str) -> set[str]:
    return {r[0] for r in pg_server.execute(_dbname(url), "select tablename from pg_tables where schemaname='public'")}


def test_migrations_up_down_and_up_again(pg_server, pg_kv: Kvdb, pg_url):
    pg_kv("add", "-d", "cs", "-q", "What is a tree?", "-a", "A connected acyclic graph.")
    assert {"pairs", "domains", "pair_vectors", "embeddings", "base_answers", "models", "store_state",
            "recorded_answers", "engine_answers", "alembic_version"} == _pg_tables(pg_server, pg_url)
    pg_kv("db", "downgrade", "0001")
    assert "pair_vectors" not in _pg_tables(pg_server, pg_url)
    assert "run `kvdb db upgrade`" in pg_kv("list", ok=False).stderr
    pg_kv("db", "upgrade")
    assert [r["question"] for r in pg_kv.json("list")] == ["What is a tree?"]
    pg_kv("db", "downgrade", "base")
    assert _pg_tables(pg_server, pg_url) == {"alembic_version"}
    pg_kv("db", "upgrade")
    status = pg_kv.json("db", "status")
    assert status["current"] == status["head"] == SCHEMA_HEAD and status["up_to_date"]


def test_models_match_migrations_on_postgres(pg_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from kvdb.lexical import in_orm_schema

    store = Store(pg_url)
    store.upgrade()
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"include_name": in_orm_schema}), Base.metadata)
    store.dispose()
    assert diff == []


# -- server errors: one line, no password, nothing changed -----------------------------------------------------------
def test_server_errors_are_one_line_without_the_password(pg_server, home):
    secret = "s3cret-pw"
    cases = [
        (pg_server.url("no_such_db").replace("kvdb@", f"kvdb:{secret}@"), "does not exist"),
        (f"postgresql+psycopg://kvdb:{secret}@127.0.0.1:1/x", "cannot connect"),
        (pg_server.url("postgres").replace("kvdb@", f"nobody:{secret}@"), "refused the login"),
        ("mysql://u@h/d", "supports SQLite and PostgreSQL"),
        ("postgresql+psycopg://kvdb@127.0.0.1:notaport/x", "not a database URL"),
    ]
    for url, needle in cases:
        res = Kvdb(home, database_url=url)("list", ok=False)
        assert needle in res.stderr, (url, res.stderr)
        assert secret not in res.output and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.output


def test_read_only_database_is_a_clear_error(pg_server, pg_kv: Kvdb, pg_url):
    pg_kv("add", "-d", "cs", "-q", "q1?", "-a", "a1.")
    pg_server.execute("postgres", f'ALTER DATABASE "{_dbname(pg_url)}" SET default_transaction_read_only = on')
    res = pg_kv("add", "-d", "cs", "-q", "q2?", "-a", "a2.", ok=False)
    assert "is read-only" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert [r["question"] for r in pg_kv.json("list")] == ["q1?"]  # reads still work


def test_disk_full_and_lock_timeout_are_translated():
    import psycopg
    from sqlalchemy import exc

    from kvdb.store.db import _translate

    where = "postgresql+psycopg://kvdb:***@db/kvdb"
    full = exc.OperationalError("INSERT", {}, psycopg.errors.DiskFull("could not extend file: No space left"))
    assert "ran out of space" in str(_translate(full, where, "postgresql", "pw"))
    locked = exc.OperationalError("SELECT", {}, psycopg.errors.LockNotAvailable("canceling statement due to lock "
                                                                                 "timeout"))
    assert "stayed locked" in str(_translate(locked, where, "postgresql"))
    leaky = exc.OperationalError("x", {}, psycopg.OperationalError("odd failure mentioning pw-123"))
    assert "pw-123" not in str(_translate(leaky, where, "postgresql", "pw-123"))


# -- writers are serialised by the advisory lock; reads take none ----------------------------------------------------
def _holds_write_lock(pg_server, url: str) -> bool:
    key = PG_WRITE_LOCK
    rows = pg_server.execute(_dbname(url), "select count(*) from pg_locks where locktype = 'advisory' and "
                             "granted and ((classid::bigint << 32) | objid::bigint) = %s", (key,))
    return rows[0][0] > 0


def test_write_takes_the_lock_read_does_not_and_waiters_time_out(pg_server, pg_url):
    store = open_store(pg_url)
    with store.read() as session:
        session.execute(select(1))
        assert not _holds_write_lock(pg_server, pg_url)
    with store.write() as session:
        store.bump_revision(session)
        assert _holds_write_lock(pg_server, pg_url)
        impatient = Store(pg_url, busy_timeout_ms=300)
        t0 = time.time()
        with pytest.raises(StoreError, match="stayed locked by another writer"):
            with impatient.write() as other:
                impatient.bump_revision(other)
        assert 0.25 < time.time() - t0 < 10
        with impatient.read() as other:  # a reader does not wait for the writer
            assert impatient.revision(other) == 0
        impatient.dispose()
    assert not _holds_write_lock(pg_server, pg_url)
    with store.read() as session:
        assert store.revision(session) == 1
    store.dispose()


def test_threads_bumping_the_revision_lose_no_update(pg_url):
    """Read-modify-write at READ COMMITTED loses updates without the lock; with it every bump counts."""
    from kvdb.store.models import StoreState

    store = open_store(pg_url)
    errors: list[BaseException] = []

    def bump(n: int) -> None:
        try:
            for _ in range(n):
                with store.write() as session:
                    value = session.scalar(select(StoreState.value).where(StoreState.key == "counter")) or 0
                    time.sleep(0.002)  # widen the window a race would need
                    row = session.get(StoreState, "counter")
                    if row is None:
                        session.add(StoreState(key="counter", value=value + 1))
                    else:
                        row.value = value + 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=bump, args=(15,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with store.read() as session:
        assert session.scalar(select(StoreState.value).where(StoreState.key == "counter")) == 60
    store.dispose()


def test_first_use_by_several_threads_migrates_once(pg_url):
    """New database, several openers at once: one migrates (under the migration lock), the others find it done."""
    errors: list[BaseException] = []
    stores: list[Store] = []

    def first_use() -> None:
        try:
            stores.append(open_store(pg_url))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(stores) == 4
    assert {s.current_revision() for s in stores} == {SCHEMA_HEAD}
    for s in stores:
        s.dispose()


WRITERS, FILES_EACH, PAIRS_EACH = 4, 5, 4


def test_concurrent_writer_processes(pg_server, pg_kv: Kvdb, tmp_path):
    """Several `kvdb add --file` processes at once on new, shared domains: no errors, the exact count, one
    revision bump per add."""
    pg_kv("init")
    files, expected = [], []
    for w in range(WRITERS):
        mine = []
        for f in range(FILES_EACH):
            path, hashes = pair_file(tmp_path, f"w{w}f{f}", PAIRS_EACH)  # the same four domains in every file
            mine.append(str(path))
            expected += hashes
        files.append(mine)
    go = tmp_path / "go"
    env = {**kvdb_env(pg_kv.home, tmp_path / "none.yaml"), "KVDB_DATABASE_URL": pg_kv.database_url}
    env.pop("KVDB_CONFIG")
    procs = []
    for w in range(WRITERS):
        out = tmp_path / f"add{w}.json"
        procs.append((out, subprocess.Popen([sys.executable, "-m", "tests.workers", "add", str(out), str(go),
                                             *files[w]], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)))
    limit = time.time() + 90
    while not all(Path(f"{out}.ready").exists() for out, _ in procs):
        assert time.time() < limit and all(p.poll() is None for _, p in procs), "a worker did not start"
        time.sleep(0.05)
    go.write_text(str(time.time() + 0.5))  # every add starts at once
    ops = []
    for out, proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-800:]
        ops += json.loads(out.read_text())
    assert [op for op in ops if op["rc"] != 0] == []
    assert len(ops) == WRITERS * FILES_EACH and all(op["result"]["added"] == PAIRS_EACH for op in ops)
    db = _dbname(pg_kv.database_url)
    hashes = [r[0] for r in pg_server.execute(db, "select hash from pairs")]
    assert len(hashes) == len(set(hashes)) == len(expected) and set(hashes) == set(expected)
    assert pg_server.execute(db, "select name from domains order by name") == [
        ("biology",), ("history",), ("math",), ("physics",)]
    assert pg_server.execute(db, "select value from store_state where key = 'revision'") == [(len(ops),)]


# -- build, query, export, import, doctor ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sqlite_built(tmp_path_factory, tiny_config) -> Kvdb:  # noqa: F811
    """A SQLite home with PAIRS built by the tiny model, exported once."""
    root = tmp_path_factory.mktemp("pgsrc")
    kv = Kvdb(root / "home", tiny_config)
    kv("add", "--file", str(write_jsonl(root / "pairs.jsonl", PAIRS)))
    kv("build")
    kv("export", "--out", str(root / "export"))
    return kv


QUESTIONS = ["What is photosynthesis?", "How do plants make sugar from light?", "What is entropy?"]


def _queries(kv: Kvdb, tmp_path: Path) -> list[tuple[str, list[str]]]:
    """Each question's matches in order. Scores are left out: the lexical part of the fused score is BM25 on SQLite
    and ts_rank_cd on PostgreSQL (kvdb.lexical), so the same store ranks alike but scores differently."""
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": q} for q in QUESTIONS])
    results = [json.loads(line) for line in kv("query", "--file", str(path), "--json").stdout.splitlines()]
    return [(r["query"], [m["hash"] for m in r["matches"]]) for r in results]


def test_build_query_export_import_remove_on_postgres(pg_server, pg_url, sqlite_built, tiny_config, tmp_path):  # noqa: F811
    kv = Kvdb(tmp_path / "pg", tiny_config, database_url=pg_url)
    kv("add", "--file", str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)))
    assert kv.json("build")["built"] == len(PAIRS)
    assert kv.json("build")["built"] == 0  # incremental: nothing left to do
    assert _queries(kv, tmp_path) == _queries(sqlite_built, tmp_path)
    files = kv.json("export", "--out", str(tmp_path / "out"))
    assert len(files) == 4
    reference = sqlite_built.home.parent / "export"
    for f in files:  # the same store content gives the same bytes, whatever the backend
        assert Path(f["path"]).read_bytes() == (reference / Path(f["path"]).name).read_bytes()
    other = Kvdb(tmp_path / "pg2", tiny_config, database_url=pg_server.url(pg_server.create_database()))
    report = other.json("import", str(reference / "knowledge_cache.pth"))
    assert report["added"] == len(PAIRS) and report["vectors"] == len(PAIRS)
    assert other.json("build")["built"] == 0
    db = _dbname(pg_url)
    top = kv.json("query", "What is entropy?")["matches"][0]
    kv("remove", top["hash"])  # the server's ON DELETE CASCADE removes its vectors and embeddings
    assert pg_server.execute(db, "select count(*) from pair_vectors where pair_hash = %s", (top["hash"],)) == [(0,)]
    assert pg_server.execute(db, "select count(*) from embeddings") == [(len(PAIRS) - 1,)]
    assert all(m["hash"] != top["hash"] for m in kv.json("query", "-k", "5", "What is entropy?")["matches"])


def _doctor(kv: Kvdb, *args: str, ok: bool = True) -> dict:
    return json.loads(kv("doctor", "--json", *args, ok=ok).stdout)


def test_doctor_on_postgres(pg_server, pg_url, sqlite_built, tiny_config, tmp_path):  # noqa: F811
    sqlite_built("db", "copy", "--to", pg_url)
    kv = Kvdb(tmp_path / "pg", tiny_config, database_url=pg_url)
    report = _doctor(kv)
    by = {f["check"]: f for f in report["findings"]}
    assert report["ok"] and by["integrity"]["status"] == "skipped" and "SQLite" in by["integrity"]["detail"]
    assert all(f["status"] == "ok" for f in report["findings"] if f["check"] != "integrity")
    assert "checked by SQL" in by["foreign_keys"]["detail"] and "5 vectors" in by["blobs"]["detail"]
    # Plant damage the server would refuse (triggers off, as a bulk load might): a row whose pair is gone, a dangling
    # domain reference, and a flipped byte in a blob.
    db = _dbname(pg_url)
    pg_server.execute(db, "SET session_replication_role = replica; "
                          "INSERT INTO embeddings (pair_hash, embedder, dim, data, checksum, created_at) "
                          "SELECT repeat('f', 64), embedder, dim, data, checksum, created_at FROM embeddings LIMIT 1;"
                          "UPDATE pair_vectors SET data = overlay(data placing '\\xff'::bytea from 200 for 1) "
                          "WHERE id = (SELECT min(id) FROM pair_vectors)")
    report = _doctor(kv, ok=False)
    problems = {f["check"] for f in report["findings"] if f["status"] == "problem"}
    assert problems == {"orphans", "foreign_keys", "blobs"}, report
    assert "embeddings -> pairs" in next(f["detail"] for f in report["findings"] if f["check"] == "foreign_keys")
    repaired = _doctor(kv, "--repair")
    assert {f["check"] for f in repaired["findings"] if f["status"] == "repaired"} >= {"orphans", "blobs"}
    assert _doctor(kv)["ok"]
    assert kv.json("build")["built"] == 1  # the deleted vectors are made again


# -- kvdb db copy ----------------------------------------------------------------------------------------------------
def _rows(url: str) -> dict[str, list[tuple]]:
    """Every row of every table, read through SQLAlchemy Core, timestamps as aware UTC."""
    store = Store(url)
    out = {}
    with store.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            (pk,) = table.primary_key.columns
            rows = []
            for r in conn.execute(select(table).order_by(pk)):
                rows.append(tuple((v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc))
                                  if hasattr(v, "tzinfo") else v for v in r))
            out[table.name] = rows
    store.dispose()
    return out


def test_copy_sqlite_to_postgres_and_back(pg_server, pg_url, sqlite_built, tiny_config, tmp_path, monkeypatch):  # noqa: F811
    import kvdb.store.copy

    monkeypatch.setattr(kvdb.store.copy, "BLOB_ROWS_PER_CHUNK", 2)  # several chunks per blob table
    monkeypatch.setattr(kvdb.store.copy, "ROWS_PER_CHUNK", 3)
    src_url = f"sqlite:///{sqlite_built.home}/kvdb.sqlite"
    original = _rows(src_url)
    assert all(original[t] for t in ("domains", "pairs", "models", "pair_vectors", "embeddings", "store_state"))
    # A base answer too, so that every table is exercised.
    from kvdb.store.models import BaseAnswer

    src = Store(src_url)
    with src.write() as session:
        pair_hash, fp = original["pair_vectors"][0][1], original["pair_vectors"][0][2]
        session.add(BaseAnswer(pair_hash=pair_hash, fingerprint=fp, prompt_format="chatml", max_new_tokens=8,
                               finished=True, text="x", data=b"\x00\x01", checksum="0" * 64))
    src.dispose()
    original = _rows(src_url)

    report = sqlite_built.json("db", "copy", "--to", pg_url)
    assert report["tables"] == {t: len(rows) for t, rows in original.items()}
    assert _rows(pg_url) == original
    back = tmp_path / "back" / "kvdb.sqlite"
    pg = Kvdb(tmp_path / "pg", tiny_config, database_url=pg_url)
    text = pg("db", "copy", "--to", f"sqlite:///{back}").stdout
    assert f"copied {sum(report['tables'].values())} row(s)" in text
    assert _rows(f"sqlite:///{back}") == original

    # The copies answer and export exactly like the original (a fresh home each: the index is rebuilt).
    sq = Kvdb(tmp_path / "sq", tiny_config, database_url=f"sqlite:///{back}")
    want = _queries(sqlite_built, tmp_path)
    assert _queries(pg, tmp_path) == want and _queries(sq, tmp_path) == want
    for kv, name in ((pg, "pg_out"), (sq, "sq_out")):
        kv("export", "--out", str(tmp_path / name))
        assert (tmp_path / name / "knowledge_cache.pth").read_bytes() == \
            (sqlite_built.home.parent / "export" / "knowledge_cache.pth").read_bytes()
    # Ids go on after the copied ones (PostgreSQL's sequences were moved past them).
    pg("add", "-d", "cs", "-q", "What is a hash table?", "-a", "A map from keys to slots.")
    ids = [r[0] for r in pg_server.execute(_dbname(pg_url), "select id from pairs order by id")]
    assert ids[-1] == max(r[0] for r in original["pairs"]) + 1


def test_copy_refusals_and_an_interrupted_copy_leaves_the_target_empty(pg_server, pg_url, tmp_path, monkeypatch):
    import kvdb.store.copy

    kv = Kvdb(tmp_path / "home")
    kv("add", "-d", "cs", "-q", "q1?", "-a", "a1.")
    kv("add", "-d", "math", "-q", "q2?", "-a", "a2.")
    src = f"sqlite:///{kv.home}/kvdb.sqlite"
    cases = [
        (src, "is the source store itself"),
        (f"sqlite:///{kv.home}/../home/kvdb.sqlite", "is the source store itself"),
        ("not-a-url", "is not a database URL"),
        ("postgresql+psycopg://kvdb@127.0.0.1:1/x", "cannot connect"),
    ]
    for url, needle in cases:
        res = kv("db", "copy", "--to", url, ok=False)
        assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr

    def boom(conn):
        raise KeyboardInterrupt  # after every row was inserted, before the commit

    monkeypatch.setattr(kvdb.store.copy, "_reset_sequences", boom)
    kv("db", "copy", "--to", pg_url, ok=False)
    db = _dbname(pg_url)
    for table in ("domains", "pairs", "store_state"):
        assert pg_server.execute(db, f"select count(*) from {table}") == [(0,)]
    monkeypatch.undo()
    assert kv.json("db", "copy", "--to", pg_url)["tables"]["pairs"] == 2
    res = kv("db", "copy", "--to", pg_url, ok=False)  # now it holds pairs
    assert "already holds 2 pair(s)" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert pg_server.execute(db, "select count(*) from pairs") == [(2,)]
