"""Concurrent use: two processes adding different files at once; four adders, a builder and two queriers at once.
No process fails with a lock error, no row is lost or duplicated, queries see only committed pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Kvdb, write_jsonl
from tests.reliability import (REPO, bad_blobs, index_pair_ids, integrity, kvdb_env, make_tiny_config, pair_file,
                               pair_hashes, store_view)


def test_two_processes_adding_different_files(tmp_path, home):
    files = []
    for w in range(2):
        rows = [{"domain": f"d{w}", "question": f"Writer {w} question {i}?", "answer": f"Answer {i}."}
                for i in range(150)]
        files.append(write_jsonl(tmp_path / f"w{w}.jsonl", rows))
    singles = [["add", "-d", "s", "-q", f"single {i}?", "-a", "s."] for i in range(10)]
    env = {**os.environ, "KVDB_HOME": str(home)}
    cmd = [sys.executable, "-m", "kvdb"]
    procs = [subprocess.Popen([*cmd, "add", "--file", str(f), "--json"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for f in files]
    singles_out = [subprocess.run([*cmd, *s], env=env, capture_output=True, text=True) for s in singles]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert json.loads(out)["added"] == 150
    for r in singles_out:
        assert r.returncode == 0, r.stderr
    assert Kvdb(home).count() == 310


def test_python_dash_m_works(home):
    env = {**os.environ, "KVDB_HOME": str(home)}
    out = subprocess.run([sys.executable, "-m", "kvdb", "--help"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "embedded knowledge database" in out.stdout


# -- adders, a builder and queriers at once (issue 6) -------------------------------------------------------------
ADDERS, FILES_EACH, PAIRS_EACH = 4, 4, 6
RUN_SECONDS = 15  # from the moment every worker is ready; start-up (torch imports on a busy machine) comes before


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return make_tiny_config(tmp_path_factory.mktemp("tiny"))


def test_adders_builder_and_queriers_at_once(tmp_path, tiny_config):
    home = tmp_path / "home"
    kv = Kvdb(home, tiny_config)
    first, expected = pair_file(tmp_path, "seed", 6, "physics")
    kv("add", "--file", str(first))
    kv("build")
    files = []
    for w in range(ADDERS):
        mine = []
        for f in range(FILES_EACH):
            path, hashes = pair_file(tmp_path, f"w{w}f{f}", PAIRS_EACH)  # four domains, physics among them
            mine.append(str(path))
            expected += hashes
        files.append(mine)
    questions = [f"What is item {i} of set w{w}f{f}?" for w in range(ADDERS) for f in range(FILES_EACH)
                 for i in (0, 4)] + ["What is item 2 of set seed?"]

    # The builder does the physics quarter of the new pairs: building all of them would outlast the run.
    jobs = [("add", files[w]) for w in range(ADDERS)] + [("build", ["--domain", "physics"])]
    jobs += [("query", questions[q::2]) for q in range(2)]
    go = tmp_path / "go"
    env = kvdb_env(home, tiny_config)
    procs = []
    for i, (role, args) in enumerate(jobs):
        out = tmp_path / f"{role}{i}.json"
        proc = subprocess.Popen([sys.executable, "-m", "tests.workers", role, str(out), str(go), *args],
                                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((role, out, proc))
    limit = time.time() + 120
    while not all(Path(f"{out}.ready").exists() for _, out, _ in procs):
        assert time.time() < limit and all(p.poll() is None for _, _, p in procs), "a worker did not start"
        time.sleep(0.1)
    go.write_text(str(time.time() + RUN_SECONDS))
    ops: dict[str, list[dict]] = {"add": [], "build": [], "query": []}
    for role, out, proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{role} worker failed: {err[-800:]}"
        ops[role] += json.loads(out.read_text())

    failed = [op for role_ops in ops.values() for op in role_ops if op["rc"] != 0]
    assert failed == [], failed[:3]
    assert len(ops["add"]) == ADDERS * FILES_EACH and all(op["result"]["added"] == PAIRS_EACH for op in ops["add"])
    assert ops["build"] and len(ops["query"]) >= 10

    hashes = pair_hashes(home)
    assert len(hashes) == len(set(hashes)) == len(expected) == 6 + ADDERS * FILES_EACH * PAIRS_EACH
    assert set(hashes) == set(expected)
    returned = {m["hash"] for op in ops["query"] for m in op["result"]["matches"]}
    assert returned <= set(hashes)  # only committed pairs, none invented or half-added
    assert integrity(home) == "ok" and bad_blobs(home) == []
    from kvdb.retrieve import Retriever
    from kvdb.runtime import Runtime

    rt = Runtime.open(home, tiny_config)
    Retriever(rt.config, rt.home, rt.store).index()
    rt.store.dispose()
    meta, covered = index_pair_ids(home)
    assert (meta["revision"], covered) == store_view(home)
    new_seen = returned - set(expected[:6])
    print(f"concurrency: {len(procs)} processes; {len(ops['add'])} file adds, {len(ops['build'])} builds "
          f"({sum(op['result']['built'] for op in ops['build'])} pairs built), {len(ops['query'])} queries "
          f"({sum(op['via'] == 'cli' for op in ops['query'])} through the CLI; {len(new_seen)} pairs added during "
          f"the run were found); errors 0")
