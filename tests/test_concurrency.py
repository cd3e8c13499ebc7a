"""Two processes adding different files at once: neither fails, no row is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import Kvdb, write_jsonl


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
