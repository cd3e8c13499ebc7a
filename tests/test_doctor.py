"""`kvdb doctor`: planted corruption (a flipped byte in a stored blob, a truncated index, an orphan temp file, orphan
rows, unreadable exports and checkpoints) is reported naming what and how to fix it; --repair fixes what can be
rebuilt and `kvdb build` restores the rest."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from kvdb.doctor import check
from kvdb.runtime import Runtime
from tests.conftest import Kvdb
from tests.reliability import bad_blobs, db, flip_byte, index_pair_ids, make_tiny_config, pair_file, store_view

CHECKS = {"schema", "integrity", "orphans", "foreign_keys", "blobs", "index", "temp_files", "exports", "checkpoints",
          "prefix states"}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return make_tiny_config(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def built_home(tmp_path_factory, tiny_config) -> Path:
    root = tmp_path_factory.mktemp("doctor")
    kv = Kvdb(root / "home", tiny_config)
    kv("add", "--file", str(pair_file(root, "doc", 6)[0]))
    kv("build")
    kv("export", "--domain", "math")
    return root / "home"


@pytest.fixture
def kv(built_home, tiny_config, tmp_path) -> Kvdb:
    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    return Kvdb(home, tiny_config)


def doctor(kv: Kvdb, *args: str, ok: bool = True) -> dict:
    result = kv("doctor", "--json", *args, ok=ok)
    return json.loads(result.stdout)


def statuses(report: dict, check_name: str) -> list[str]:
    return [f["status"] for f in report["findings"] if f["check"] == check_name]


def details(report: dict, check_name: str) -> str:
    return "\n".join(f["detail"] for f in report["findings"] if f["check"] == check_name)


def test_clean_home_json_shape_and_text(kv: Kvdb):
    report = doctor(kv)
    assert set(report) == {"ok", "repair", "findings"} and report["ok"] is True and report["repair"] is False
    assert {f["check"] for f in report["findings"]} == CHECKS
    for f in report["findings"]:
        assert set(f) == {"check", "status", "detail"} and f["status"] == "ok" and f["detail"]
    assert "1 export file(s) load" in details(report, "exports")
    text = kv("doctor").stdout.splitlines()
    assert len(text) == len(CHECKS) and all(line.startswith("ok ") for line in text)


@pytest.mark.parametrize("table", ["pair_vectors", "embeddings"])
def test_flipped_byte_is_named_repaired_and_rebuilt(kv: Kvdb, table):
    pair = flip_byte(kv.home, table)
    result = kv("doctor", ok=False)
    assert result.exit_code == 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("problem"))
    assert pair[:12] in line and table in line and "kvdb doctor --repair" in line and "kvdb build" in line
    assert "problem(s) found" in result.stderr
    report = doctor(kv, ok=False)
    assert report["ok"] is False and statuses(report, "blobs") == ["problem"]

    repaired = doctor(kv, "--repair")
    assert repaired["ok"] is True and statuses(repaired, "blobs") == ["repaired"]
    assert pair[:12] in details(repaired, "blobs") and "kvdb build" in details(repaired, "blobs")
    with db(kv.home) as conn:
        assert conn.execute(f"select count(*) from {table} where pair_hash = ?", (pair,)).fetchone()[0] == 0
    built = kv.json("build")
    assert built["built" if table == "pair_vectors" else "embedded"] == 1
    assert bad_blobs(kv.home) == []
    with db(kv.home) as conn:
        assert conn.execute(f"select count(*) from {table}").fetchone()[0] == 6
    clean = doctor(kv)
    assert clean["ok"] and set(statuses(clean, "blobs")) == {"ok"}


def test_truncated_index_is_detected_and_rebuilt(kv: Kvdb):
    faiss_file = next((kv.home / "index").rglob("index.faiss"))
    os.truncate(faiss_file, faiss_file.stat().st_size // 2)
    report = doctor(kv, ok=False)
    assert statuses(report, "index") == ["problem"] and "truncated" in details(report, "index")
    repaired = doctor(kv, "--repair")
    assert statuses(repaired, "index") == ["repaired"] and repaired["ok"]
    meta, covered = index_pair_ids(kv.home)
    revision, live = store_view(kv.home)
    assert meta["revision"] == revision and covered == live and len(live) == 6
    assert doctor(kv)["ok"]


def test_garbage_index_metadata_is_detected(kv: Kvdb):
    meta_file = next((kv.home / "index").rglob("index.json"))
    meta_file.write_text("{not json")
    assert statuses(doctor(kv, ok=False), "index") == ["problem"]
    assert doctor(kv, "--repair")["ok"] and doctor(kv)["ok"]


def test_stale_index_is_fine_and_repair_refreshes_it(kv: Kvdb):
    kv("remove", kv.json("list")[0]["hash"])
    report = doctor(kv)
    assert report["ok"] and "next query rebuilds it" in details(report, "index")
    assert statuses(doctor(kv, "--repair"), "index") == ["repaired"]
    meta, covered = index_pair_ids(kv.home)
    assert (meta["revision"], covered) == store_view(kv.home)


def test_orphan_temp_files_are_removed_and_live_ones_left(kv: Kvdb):
    old = kv.home / "knowledge_cache" / ".knowledge_cache.pth.k2j3h4l5.tmp"
    old.write_bytes(b"half an export")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    index_dir = next(p for p in (kv.home / "index").iterdir() if p.is_dir())
    dead = index_dir / f".index.faiss.{2 ** 22 + 12345}.0123abcd.tmp"  # a pid above any default pid_max
    dead.write_bytes(b"x")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    young = kv.home / "checkpoints" / ".best_draft_model_epoch1.pth.abcdefgh.tmp"
    young.parent.mkdir()
    young.write_bytes(b"being written")
    report = doctor(kv, ok=False)
    assert statuses(report, "temp_files") == ["problem", "problem"]
    assert ".knowledge_cache.pth.k2j3h4l5.tmp" in details(report, "temp_files")
    repaired = doctor(kv, "--repair")
    assert repaired["ok"] and statuses(repaired, "temp_files") == ["repaired", "repaired"]
    assert not old.exists() and not dead.exists() and young.exists()
    assert "being written now" in details(doctor(kv), "temp_files")


def test_orphan_rows_are_deleted(kv: Kvdb):
    with db(kv.home) as conn:  # rows whose pair is gone, as a tool without foreign keys could leave them
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("insert into embeddings (pair_hash, embedder, dim, data, checksum, created_at) "
                     "select 'f' || substr(pair_hash, 2), embedder, dim, data, checksum, created_at from embeddings "
                     "limit 2")
    report = doctor(kv, ok=False)
    assert "2 in embeddings" in details(report, "orphans") and statuses(report, "foreign_keys") == ["problem"]
    repaired = doctor(kv, "--repair")
    assert statuses(repaired, "orphans") == ["repaired"] and statuses(repaired, "foreign_keys") == ["ok"]
    assert repaired["ok"]
    with db(kv.home) as conn:
        assert conn.execute("select count(*) from embeddings").fetchone()[0] == 6


def test_unreadable_export_and_checkpoint_are_reported_not_deleted(kv: Kvdb):
    export = next((kv.home / "knowledge_cache").glob("knowledge_cache_math.pth"))
    export.write_bytes(export.read_bytes()[:1000])  # truncated
    ckpt = kv.home / "checkpoints" / "best_draft_model_epoch1.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"PK\x03\x04 not a checkpoint")
    for args in ((), ("--repair",)):
        report = doctor(kv, *args, ok=False)
        assert statuses(report, "exports") == ["problem"] and "kvdb export" in details(report, "exports")
        assert statuses(report, "checkpoints") == ["problem"] and ckpt.name in details(report, "checkpoints")
    assert export.exists() and ckpt.exists()


def test_damaged_prefix_states_are_reported_and_repair_deletes_them(kv: Kvdb):
    from kvdb.engines.statecache import PrefixState, StateCache, encode_state

    folder = kv.home / "models" / "states"
    cache = StateCache(folder)
    for n in (3, 5):
        cache.put(PrefixState(tuple(range(n)), '{"engine":"llama_cpp"}', bytes(range(n)) * 100, 7))
    assert doctor(kv)["ok"] and "2 prefix state(s)" in details(doctor(kv), "prefix states")
    good, damaged = sorted(folder.iterdir())
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # a flipped byte in the KV bytes: the checksum no longer matches
    damaged.write_bytes(bytes(data))
    (folder / good.name.replace(good.stem, "0" * 64)).write_bytes(encode_state(
        PrefixState((1,), "{}", b"x", 1)))  # whole but under another state's name
    report = doctor(kv, ok=False)
    assert statuses(report, "prefix states") == ["problem"] and "2 damaged" in details(report, "prefix states")
    assert statuses(doctor(kv, "--repair"), "prefix states") == ["repaired"]
    assert sorted(folder.iterdir()) == [good] and doctor(kv)["ok"]


def test_schema_behind_names_the_upgrade(kv: Kvdb):
    kv("db", "downgrade", "0001")
    report = doctor(kv, ok=False)
    assert statuses(report, "schema") == ["problem"] and "kvdb db upgrade" in details(report, "schema")
    kv("db", "upgrade")


def test_new_home_and_library_api(tmp_path, tiny_config):
    rt = Runtime.open(tmp_path / "fresh", tiny_config)
    report = check(rt)
    assert report.ok and "no store yet" in report.findings[0].detail
    assert not (tmp_path / "fresh" / "kvdb.sqlite").exists()  # checking creates nothing
    kv = Kvdb(tmp_path / "fresh", tiny_config)
    kv("add", "-d", "math", "-q", "One?", "-a", "Two.")
    report = check(Runtime.open(tmp_path / "fresh", tiny_config))
    assert report.ok and "no index yet" in next(f.detail for f in report.findings if f.check == "index")


def test_damaged_database_file_is_reported(kv: Kvdb):
    path = kv.home / "kvdb.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[:16] = b"not a database!!"
    path.write_bytes(bytes(data))
    report = doctor(kv, ok=False)
    assert statuses(report, "schema") == ["problem"] and "cannot be read" in details(report, "schema")
