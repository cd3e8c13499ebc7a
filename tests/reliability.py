"""Helpers shared by the reliability tests (doctor, crash, concurrency, stateful): a tiny-model config, pair files,
`python -m kvdb` subprocesses, and store checks that read SQLite directly, independent of the code under test."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parent.parent

# The tiny model of tests/test_build_query.py, plus what `kvdb train --epochs 1` needs (see tests/test_train.py).
TINY_SECTIONS = {"index": {"rerank": False, "confident_threshold_no_rerank": 0.5},
                 "training": {"num_epochs": 1}, "generation": {"max_new_tokens": 8}}


def make_tiny_config(folder: Path) -> Path:
    from tests.tiny import make_model, write_tiny_config

    model = make_model(folder / "llama", layers=4, hidden=64)
    return write_tiny_config(folder / "tiny.yaml", model, **TINY_SECTIONS)


def pair_rows(tag: str, n: int, domain: str | None = None) -> list[dict]:
    """``n`` distinct pairs whose text names ``tag`` (so files of different tags never collide)."""
    domains = ["physics", "biology", "math", "history"]
    return [{"domain": domain or domains[i % len(domains)],
             "question": f"What is item {i} of set {tag}?",
             "answer": f"Item {i} of set {tag} is a small fact number {i * 7 % 11} about {tag}."}
            for i in range(n)]


def pair_file(folder: Path, tag: str, n: int, domain: str | None = None) -> tuple[Path, list[str]]:
    """A JSONL file of ``n`` pairs and their hashes."""
    from kvdb.store.pairs import pair_hash

    rows = pair_rows(tag, n, domain)
    path = write_jsonl(folder / f"{tag}.jsonl", rows)
    return path, [pair_hash(r["question"], r["answer"]) for r in rows]


def kvdb_env(home: Path, config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KVDB_DATABASE_URL", "KVDB_DEBUG")}
    env.update(KVDB_HOME=str(home), KVDB_CONFIG=str(config), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


def kvdb_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvdb", *args]


def run_kvdb(home: Path, config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(kvdb_cmd(*args), env=kvdb_env(home, config), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


# -- direct checks on the SQLite file -------------------------------------------------------------------------------
def db(home: Path) -> sqlite3.Connection:
    return sqlite3.connect(home / "kvdb.sqlite", timeout=60)


def integrity(home: Path) -> str:
    with db(home) as conn:
        return "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))


def pair_hashes(home: Path) -> list[str]:
    """Every stored pair hash (with repeats, if there ever were any)."""
    if not (home / "kvdb.sqlite").exists():
        return []
    with db(home) as conn:
        try:
            return [r[0] for r in conn.execute("select hash from pairs")]
        except sqlite3.OperationalError:  # a kill before the schema was created
            return []


def bad_blobs(home: Path) -> list[str]:
    """``table:pair`` for every vectors/embedding row whose bytes do not match their sha256, or whose token count
    disagrees with the tensors (half-written vectors)."""
    from safetensors.torch import load as st_load

    bad = []
    if not (home / "kvdb.sqlite").exists():
        return bad
    with db(home) as conn:
        try:
            rows = conn.execute("select 'pair_vectors', pair_hash, data, checksum, num_tokens from pair_vectors "
                                "union all select 'embeddings', pair_hash, data, checksum, -1 from embeddings").fetchall()
        except sqlite3.OperationalError:
            return bad
    for table, h, data, digest, num_tokens in rows:
        if hashlib.sha256(data).hexdigest() != digest:
            bad.append(f"{table}:{h[:12]}")
            continue
        if num_tokens >= 0:
            tensors = st_load(bytes(data))
            if any(t.shape[0] != num_tokens for t in tensors.values()):
                bad.append(f"{table}:{h[:12]} (length)")
    return bad


def flip_byte(home: Path, table: str, pair: str | None = None) -> str:
    """Flip one byte in the middle of a stored blob of ``table``; returns the pair's hash."""
    with db(home) as conn:
        where = "where pair_hash = ?" if pair else ""
        rid, h, data = conn.execute(f"select id, pair_hash, data from {table} {where} order by id limit 1",
                                    (pair,) if pair else ()).fetchone()
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        conn.execute(f"update {table} set data = ? where id = ?", (bytes(b), rid))
    return h


def index_pair_ids(home: Path) -> tuple[dict, set[int]] | None:
    """(index.json meta, pair ids covered) of the one index under ``home/index``, or None if there is none."""
    from kvdb.index import VectorIndex
    from kvdb.retrieve import SLOTS

    folders = [p for p in (home / "index").glob("*") if p.is_dir()]
    if not folders:
        return None
    index = VectorIndex.load(folders[0])
    if index is None:
        return None
    return index.meta, {int(i) // SLOTS for i in index.ids()}


def store_view(home: Path) -> tuple[int, set[int]]:
    """(store revision, ids of pairs that have an embedding)."""
    with db(home) as conn:
        try:
            rev = conn.execute("select value from store_state where key = 'revision'").fetchone()
            ids = {r[0] for r in conn.execute("select p.id from pairs p join embeddings e on e.pair_hash = p.hash")}
        except sqlite3.OperationalError:  # a kill before the schema was created: the file exists, the tables do not
            return 0, set()
    return (rev[0] if rev else 0), ids


def json_out(proc: subprocess.CompletedProcess):
    return json.loads(proc.stdout)
