"""Hostile and odd input (issue 6, parts 4 and 6): booby-trapped `.pth` files handed to every command that reads one,
YAML that would run code, metadata past the limits, SQL-looking text, control characters, right-to-left marks, emoji
and Chinese, a read-only home and a full disk. Every failure ends in one sentence and a non-zero exit code, with no
traceback unless --debug; no planted code ever runs (a sentinel file would appear); nothing stored is lost."""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvdb.store.pairs import pair_hash
from tests.conftest import Kvdb, write_jsonl
from tests.reliability import (REPO, bad_blobs, index_pair_ids, integrity, kvdb_cmd, kvdb_env, make_tiny_config,
                               pair_file, pair_hashes, run_kvdb, store_view)

Q = "What is item 1 of set base?"

# Text that must come back exactly as it went in (the hash is computed on the NFC, whitespace-collapsed form; the
# stored text is kept as given). NUL is refused (tests/test_pairs_cli.py).
WEIRD = {
    "sql": "'; DROP TABLE pairs; --",
    "sql2": "Robert'); DELETE FROM pairs WHERE '1'='1'; -- \" OR 1=1 /* %s %(x)s ? :name $1 */",
    "control": "tab\there, bell\x07, escape \x1b[31mred\x1b[0m, backspace\x08, CR\r LF\n VT\x0b FF\x0c DEL\x7f",
    "bidi": "mark \u200f, override \u202eexe.txt\u202c, Arabic \u0645\u0631\u062d\u0628\u0627, "
            "Hebrew \u05e9\u05dc\u05d5\u05dd",
    "emoji": "emoji 😀🚀, family 👨‍👩‍👧‍👦, flag 🇨🇳, skin tone 👍🏽, keycap 1️⃣, rainbow 🏳️‍🌈",
    "chinese": "中文问题：什么是栈？它是一种后进先出（LIFO）的数据结构。",
    "separators": "line\u2028separator, paragraph\u2029separator, NEL\u0085, zero width\u200b, ZWJ\u200d, BOM\ufeff",
    "combining": "decomposed cafe\u0301 beside composed caf\u00e9, A\u030a beside \u00c5",
    "spaces": "  leading, trailing and  double  spaces  ",
}


def weird_rows(domain: str) -> list[dict]:
    return [{"domain": domain, "question": f"{text} ({key}, {domain})?", "answer": f"{text} — the {key} answer.",
             "note": text, WEIRD["sql"]: WEIRD["bidi"] + WEIRD["emoji"], "nested": {"list": [text, 1, None, True]}}
            for key, text in WEIRD.items()]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return make_tiny_config(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory, tiny_config) -> Path:
    """Built, exported and trained (one epoch), with the weird pairs among the ordinary ones."""
    root = tmp_path_factory.mktemp("hostile")
    kv = Kvdb(root / "home", tiny_config)
    kv("add", "--file", str(pair_file(root, "base", 8)[0]))
    kv("add", "--file", str(write_jsonl(root / "weird.jsonl", weird_rows("weird"))))
    kv("build")
    kv("export")
    kv("train", "--epochs", "1", "--no-variants")
    return root / "home"


@pytest.fixture
def kv(trained_home, tiny_config, tmp_path) -> Kvdb:
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    return Kvdb(home, tiny_config)


def one_error_line(stderr: str) -> str:
    """The single error line of a failed command (notices may come before it); fails on anything else."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("notice: ")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- booby-trapped .pth files -------------------------------------------------------------------------------------
class _Trap:
    """Unpickling this runs code: a shell command (``os.system``) or Python source (``exec``)."""

    def __init__(self, sentinel: Path, how: str = "system"):
        self.sentinel, self.how = sentinel, how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.sentinel}",)
        return exec, (f"open({str(self.sentinel)!r}, 'w').close()",)


def trapped_pth(folder: Path, kind: str, variant: str, sentinel: Path, home: Path) -> Path:
    """A .pth whose unpickling would create ``sentinel``. kind: cache | checkpoint. variant: raw (a plain pickle, not
    a torch archive), zip (torch.save of a dict with the right format fields) or trojan (a real kvdb file of that kind
    with the trap tucked inside)."""
    path = folder / f"{kind}_{variant}.pth"
    fmt = {"cache": "kvdb.knowledge_cache", "checkpoint": "kvdb.draft_checkpoint"}[kind]
    if variant == "raw":
        path.write_bytes(pickle.dumps({"format": fmt, "version": 1, "x": _Trap(sentinel, "exec")}, protocol=4))
    elif variant == "zip":
        torch.save({"format": fmt, "version": 1, "x": _Trap(sentinel)}, path)
    else:
        real = (home / "knowledge_cache" / "knowledge_cache.pth" if kind == "cache"
                else next((home / "checkpoints").glob("best_draft_model_epoch*.pth")))
        obj = torch.load(real, weights_only=True)
        if kind == "cache":
            obj["qa_pairs"][0]["metadata"]["trap"] = _Trap(sentinel)
        else:
            obj["metrics"]["trap"] = _Trap(sentinel)
        torch.save(obj, path)
    return path


def test_the_traps_are_live(kv: Kvdb, tmp_path):
    """The sentinel checks below have teeth: loading each trap the unsafe way does run its code."""
    for kind in ("cache", "checkpoint"):
        for variant in ("raw", "zip", "trojan"):
            sentinel = tmp_path / f"ran_{kind}_{variant}"
            path = trapped_pth(tmp_path, kind, variant, sentinel, kv.home)
            if variant == "raw":
                pickle.loads(path.read_bytes())
            else:
                torch.load(path, weights_only=False)
            assert sentinel.exists(), (kind, variant)


# Every command that reads a .pth the user names; FILE is the trapped file, OUT an empty folder.
PTH_COMMANDS = {
    "import": ("cache", ["import", "FILE"]),
    "train --cache": ("cache", ["train", "--cache", "FILE", "--epochs", "1", "--out", "OUT"]),
    "query --cache": ("cache", ["query", "--cache", "FILE", Q]),
    "query --cache --generate": ("cache", ["query", "--cache", "FILE", "--generate", "-n", "4", Q]),
    "query --generate --draft": ("checkpoint", ["query", "--generate", "--draft", "FILE", "-n", "4", Q]),
    "bench --draft": ("checkpoint", ["bench", "--draft", "FILE", "--per-workload", "1", "-n", "4",
                                     "--methods", "greedy,kvdb_draft"]),
    # train reads checkpoints from its output folder too: the one to resume from, the best one to evaluate.
    "train --resume": ("checkpoint", ["train", "--resume", "--out", "OUT", "--epochs", "1"]),
    "train --eval-only": ("checkpoint", ["train", "--eval-only", "--out", "OUT"]),
}
IN_OUT = {"train --resume": "draft_model_epoch9.pth", "train --eval-only": "best_draft_model_epoch9.pth"}
NEEDLE = {"cache": "kvdb cache", "checkpoint": "not a kvdb draft checkpoint"}


@pytest.mark.parametrize("variant", ["raw", "zip", "trojan"])
@pytest.mark.parametrize("command", list(PTH_COMMANDS))
def test_trapped_pth_is_refused_and_never_runs(kv: Kvdb, tmp_path, command, variant):
    kind, args = PTH_COMMANDS[command]
    sentinel = tmp_path / "PWNED"
    trap = trapped_pth(tmp_path, kind, variant, sentinel, kv.home)
    out = tmp_path / "out"
    out.mkdir()
    if command in IN_OUT:
        trap = trap.rename(out / IN_OUT[command])
    before = sorted(pair_hashes(kv.home))
    res = kv(*[str(trap) if a == "FILE" else str(out) if a == "OUT" else a for a in args], ok=False)
    line = one_error_line(res.stderr)
    assert trap.name in line and NEEDLE[kind] in line, line
    assert not sentinel.exists(), "the trapped pickle ran"
    assert sorted(pair_hashes(kv.home)) == before
    assert sorted(p.name for p in out.iterdir()) == ([trap.name] if command in IN_OUT else [])


def test_trapped_checkpoint_in_the_home(kv: Kvdb, tmp_path):
    """A trap named like the newest best checkpoint: answering falls back to copying with a notice, doctor reports
    it, and it never runs."""
    sentinel = tmp_path / "PWNED"
    for variant in ("zip", "raw"):
        trap = trapped_pth(tmp_path, "checkpoint", variant, sentinel, kv.home)
        planted = kv.home / "checkpoints" / "best_draft_model_epoch9.pth"
        shutil.copy(trap, planted)
        res = kv("query", "--generate", "-n", "6", "--json", Q)
        assert json.loads(res.stdout)["output_ids"] == kv.json("query", "--generate", "--no-draft", "-n", "6", Q)[
            "output_ids"]
        assert f"notice: {planted} is not a kvdb draft checkpoint" in res.stderr and "copying only" in res.stderr
        doctor = kv("doctor", "--json", ok=False)
        found = [f for f in json.loads(doctor.stdout)["findings"] if f["check"] == "checkpoints"]
        assert [f["status"] for f in found] == ["problem"] and planted.name in found[0]["detail"]
        one_error_line(doctor.stderr)
        bench = kv("bench", "--per-workload", "1", "-n", "4", "--methods", "greedy,kvdb_draft", "--json")
        assert "copying only" in bench.stderr
        assert not sentinel.exists()
    trap = trapped_pth(tmp_path, "cache", "trojan", sentinel, kv.home)
    shutil.copy(trap, kv.home / "knowledge_cache" / "knowledge_cache_evil.pth")
    found = [f for f in json.loads(kv("doctor", "--json", ok=False).stdout)["findings"] if f["check"] == "exports"]
    assert [f["status"] for f in found] == ["problem"] and "knowledge_cache_evil.pth" in found[0]["detail"]
    assert not sentinel.exists()


# -- metadata past the limits, in a cache handed to import ---------------------------------------------------------
def test_import_refuses_metadata_past_the_limits(kv: Kvdb, tmp_path, tiny_config):
    obj = torch.load(kv.home / "knowledge_cache" / "knowledge_cache.pth", weights_only=True)
    deep: dict = {}
    for _ in range(3000):
        deep = {"a": deep}
    fresh = Kvdb(tmp_path / "fresh", tiny_config)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # torch.save pickles recursively; loading (and kvdb's depth check) does not
    try:
        for name, value, needle in [("deep", deep, "nested deeper than 32 levels"),
                                    ("huge", "x" * 3_000_000, "over the limit of 65536")]:
            obj["qa_pairs"][-1]["metadata"] = {"payload": value}
            path = tmp_path / f"{name}.pth"
            torch.save(obj, path)
            line = one_error_line(fresh("import", str(path), ok=False).stderr)
            assert needle in line and f"{path}#{len(obj['qa_pairs']) - 1}" in line, line
            assert fresh.count() == 0
    finally:
        sys.setrecursionlimit(limit)


# -- odd text round-trips exactly -----------------------------------------------------------------------------------
def _csv(rows: list[dict]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=["domain", "question", "answer", "note"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def test_odd_text_round_trips_exactly(tmp_path):
    kv = Kvdb(tmp_path / "home")  # the store alone: no model needed
    by_file = weird_rows("by_file")
    kv("add", "--file", str(write_jsonl(tmp_path / "weird.jsonl", by_file)))
    by_csv = weird_rows("by_csv")
    (tmp_path / "weird.csv").write_text(_csv(by_csv), encoding="utf-8", newline="")
    kv("add", "--file", str(tmp_path / "weird.csv"))
    by_option = weird_rows("by_option")
    for row in by_option:
        kv("add", "-d", row["domain"], "-q", row["question"], "-a", row["answer"], "-m", f"note={row['note']}",
           "-m", "nested=" + json.dumps(row["nested"], ensure_ascii=False))
    listed = kv.json("list")
    assert len(listed) == 3 * len(WEIRD) == kv.count()  # the SQL-looking text dropped nothing
    got = {(r["domain"], r["question"]): r for r in listed}
    for row in by_file + by_csv + by_option:
        stored = got[(row["domain"], row["question"])]
        assert stored["answer"] == row["answer"]
        assert stored["hash"] == pair_hash(row["question"], row["answer"])
        meta = {k: v for k, v in row.items() if k not in ("domain", "question", "answer")}
        if row["domain"] == "by_csv":
            meta = {"note": row["note"]}
        elif row["domain"] == "by_option":
            meta = {"note": row["note"], "nested": row["nested"]}
        assert stored["metadata"] == meta
        shown = kv.json("show", stored["hash"])
        assert (shown["question"], shown["answer"], shown["metadata"]) == (row["question"], row["answer"], meta)
    # Text output for a terminal shows control characters escaped, so a stored ESC sequence cannot rewrite it.
    control = next(r for r in listed if "(control," in r["question"])
    for out in (kv("list").stdout, kv("show", control["hash"]).stdout):
        assert "\x1b" not in out and "\x07" not in out and "\\x1b[31m" in out
    emoji = got[("by_file", next(r["question"] for r in by_file if "(emoji," in r["question"]))]
    assert "中文问题" in kv("list").stdout and "👨‍👩‍👧‍👦" in kv("show", emoji["hash"]).stdout


def test_odd_text_survives_export_and_import(kv: Kvdb, tmp_path, tiny_config):
    keys = ("hash", "domain", "question", "answer", "metadata")
    original = sorted(({k: r[k] for k in keys} for r in kv.json("list")), key=lambda r: r["hash"])
    assert sum(r["domain"] == "weird" for r in original) == len(WEIRD)
    other = Kvdb(tmp_path / "other", tiny_config)
    report = other.json("import", str(kv.home / "knowledge_cache" / "knowledge_cache.pth"))
    assert report["added"] == report["vectors"] == len(original)
    assert sorted(({k: r[k] for k in keys} for r in other.json("list")), key=lambda r: r["hash"]) == original
    assert other.json("build")["built"] == 0  # the vectors came along with the text they belong to


# -- a read-only home -----------------------------------------------------------------------------------------------
def _read_only(home: Path) -> tuple[list[str], object]:
    """(command prefix, undo) that make ``home`` read-only for a kvdb subprocess. As root, permission bits are
    ignored, so the home is bind-mounted read-only in a private mount namespace instead."""
    if os.geteuid() != 0:
        for p in [home, *home.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)

        def undo():
            for p in [home, *home.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)

        return [], undo
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    prefix = ["unshare", "-m", "--", "sh", "-c", script, str(home)]
    if shutil.which("unshare"):
        probe = subprocess.run([*prefix, "sh", "-c", f"! touch {home}/.probe"], capture_output=True)
        if probe.returncode == 0 and not (home / ".probe").exists():
            return prefix, lambda: None
    pytest.skip("running as root without mount namespaces: permission bits are ignored and no read-only mount "
                "can be made (the read-only database URL test still runs)")


def test_read_only_home(kv: Kvdb, tmp_path):
    before = sorted(pair_hashes(kv.home))
    new = write_jsonl(tmp_path / "new.jsonl", [{"domain": "cs", "question": "New?", "answer": "New."}])

    def attempt(shm_present: bool) -> None:
        prefix, undo = _read_only(kv.home)
        try:
            def run(*args: str) -> subprocess.CompletedProcess:
                return subprocess.run([*prefix, *kvdb_cmd(*args)], env=kvdb_env(kv.home, kv.config),
                                      capture_output=True, text=True, timeout=120, cwd=REPO)

            for args in (["add", "-d", "cs", "-q", "Read only?", "-a", "Refused."], ["add", "--file", str(new)]):
                res = run(*args)
                assert res.returncode > 0, res
                line = one_error_line(res.stderr)
                assert "read-only" in line and str(kv.home) in line, line
            # SQLite reads a WAL store only through its -shm file: where that is missing and cannot be made, even
            # reading is refused, in one sentence that names the cause.
            res = run("list", "--json")
            if res.returncode == 0:
                assert shm_present and len(json.loads(res.stdout)) == len(before)
            else:
                assert "read-only" in one_error_line(res.stderr)
        finally:
            undo()

    attempt(shm_present=(kv.home / "kvdb.sqlite-shm").exists())
    gc.collect()  # tests.reliability's sqlite3 connections close when collected
    with contextlib.closing(sqlite3.connect(kv.home / "kvdb.sqlite")) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the last connection to close removes -wal and -shm
    assert not (kv.home / "kvdb.sqlite-shm").exists()
    attempt(shm_present=False)
    assert sorted(pair_hashes(kv.home)) == before and integrity(kv.home) == "ok"


def test_read_only_database_url(kv: Kvdb):
    before = sorted(pair_hashes(kv.home))
    env = {**kvdb_env(kv.home, kv.config),
           "KVDB_DATABASE_URL": f"sqlite:///file:{kv.home / 'kvdb.sqlite'}?mode=ro&uri=true"}
    res = subprocess.run(kvdb_cmd("list", "--json"), env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0 and len(json.loads(res.stdout)) == len(before), res.stderr
    res = subprocess.run(kvdb_cmd("add", "-d", "cs", "-q", "Read only?", "-a", "Refused."), env=env,
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode > 0
    assert f"the store at {kv.home / 'kvdb.sqlite'} is read-only" in one_error_line(res.stderr)
    assert not (REPO / "file:").exists()  # the URI's path is the file's, not a folder to create
    assert sorted(pair_hashes(kv.home)) == before and integrity(kv.home) == "ok"


# -- a full disk (RLIMIT_FSIZE: a write past the limit fails with EFBIG) ------------------------------------------
def run_limited(home: Path, config: Path, limit: int, *args: str) -> subprocess.CompletedProcess:
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(kvdb_cmd(*args), env=kvdb_env(home, config), capture_output=True, text=True, timeout=300,
                          cwd=REPO, preexec_fn=limit_file_size)


def _disk_full(res: subprocess.CompletedProcess) -> None:
    assert res.returncode > 0, (res.returncode, res.stderr[-2000:])  # an error exit, not a crash by signal
    assert "disk full or file too large while writing" in one_error_line(res.stderr)


def test_full_disk_during_add_build_and_export(kv: Kvdb, tmp_path):
    home, cfg = kv.home, kv.config
    # add: a 1.5 MB file into a store that may grow by 256 kB
    before = sorted(pair_hashes(home))
    big = write_jsonl(tmp_path / "big.jsonl", [{"domain": "cs", "question": f"Big question {i}?",
                                                "answer": f"{i} " + "x" * 15_000} for i in range(100)])
    _disk_full(run_limited(home, cfg, 256_000, "add", "--file", str(big)))
    assert integrity(home) == "ok" and sorted(pair_hashes(home)) == before

    # build: 40 new pairs to prefill, and room for few of them
    new, hashes = pair_file(tmp_path, "more", 40)
    kv("add", "--file", str(new))
    before = sorted(pair_hashes(home))
    _disk_full(run_limited(home, cfg, 128_000, "build"))
    assert integrity(home) == "ok" and sorted(pair_hashes(home)) == before and bad_blobs(home) == []
    assert kv.json("build")["failed"] == 0  # the rerun completes what was not committed
    _, indexed = index_pair_ids(home)
    assert indexed == store_view(home)[1]

    # export: the old files stay whole (their bytes unchanged), no temporary file is left behind
    folder = home / "knowledge_cache"
    old = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    res = run_limited(home, cfg, 40_000, "export")
    _disk_full(res)
    assert "knowledge_cache.pth" in res.stderr and "the old file, if any, is unchanged" in res.stderr
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == old
    assert integrity(home) == "ok" and sorted(pair_hashes(home)) == before

    # with room again, everything works
    kv("add", "--file", str(big))
    assert kv.count() == len(before) + 100


def test_full_disk_during_train(kv: Kvdb, tmp_path):
    out = tmp_path / "ckpt"
    res = run_limited(kv.home, kv.config, 300_000, "train", "--epochs", "1", "--no-variants", "--out", str(out))
    assert res.returncode > 0, (res.returncode, res.stderr[-2000:])
    line = one_error_line(res.stderr)
    assert "cannot write the checkpoint" in line and "disk has space" in line, line
    assert not list(out.glob("*.pth")) and not list(out.glob(".*"))  # no half checkpoint, no temporary file


# -- every bad input: one sentence, a non-zero exit, no traceback (via `python -m kvdb`) -----------------------------
def _bad_files(tmp: Path, home: Path, sentinel: Path) -> None:
    """Every file the cases below name, in ``tmp``."""
    good = {"domain": "cs", "question": "Fine?", "answer": "Fine."}
    files = {
        "malformed.jsonl": json.dumps(good) + "\n{not json\n",
        "deep.jsonl": '{"domain":"cs","question":"D?","answer":"d.","m":' + '{"a":' * 100_000 + "1" + "}" * 100_000
                      + "}\n",
        "huge.jsonl": json.dumps({**good, "blob": "x" * 5_000_000}) + "\n",
        "nul.jsonl": json.dumps({**good, "question": "a\u0000b"}) + "\n",
        "queries.jsonl": '{"query": "fine?"}\n{"nope": 1}\n',
        "evil.yaml": f'model: !!python/object/apply:os.system ["touch {sentinel}"]\n',
        "unknown.yaml": "model:\n  sauce: x\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    (tmp / "latin1.jsonl").write_bytes(b'{"domain": "cs", "question": "caf\xe9?", "answer": "a."}\n')
    torch.save({"some": torch.zeros(2)}, tmp / "foreign.pth")
    for kind, variant in [("cache", "zip"), ("cache", "raw"), ("cache", "trojan"), ("checkpoint", "raw"),
                          ("checkpoint", "trojan")]:
        trapped_pth(tmp, kind, variant, sentinel, home)
    (tmp / "garbage_home").mkdir()
    (tmp / "garbage_home" / "kvdb.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(5000))


def _plant_checkpoint(tmp: Path, home: Path) -> None:
    shutil.copy(tmp / "checkpoint_trojan.pth", home / "checkpoints" / "draft_model_last.pth")


# name: (arguments, with {tmp} for the folder of _bad_files; what the error line says; set-up or None)
BAD_INPUTS = {
    "malformed JSONL": (["add", "--file", "{tmp}/malformed.jsonl"], ":2: not valid JSON", None),
    "metadata 100000 deep (file)": (["add", "--file", "{tmp}/deep.jsonl"], "nested too deeply", None),
    "metadata of 5 MB (file)": (["add", "--file", "{tmp}/huge.jsonl"], "over the limit of 65536", None),
    "metadata 5000 deep (--meta)": (["add", "-d", "cs", "-q", "q?", "-a", "a.", "-m", "x=" + "[" * 5000 + "]" * 5000],
                                    "nested too deeply", None),
    "metadata of 100 kB (--meta)": (["add", "-d", "cs", "-q", "q?", "-a", "a.", "-m", "x=" + "y" * 100_000],
                                    "over the limit of 65536", None),
    "NUL in a file": (["add", "--file", "{tmp}/nul.jsonl"], "NUL", None),
    "Latin-1 file": (["add", "--file", "{tmp}/latin1.jsonl"], "not valid UTF-8", None),
    "invalid UTF-8 argument": (["add", "-d", "cs", "-q", b"caf\xe9?", "-a", "a."], "not valid UTF-8", None),
    "missing file": (["add", "--file", "{tmp}/missing.jsonl"], "does not exist", None),
    "SQL as a domain": (["add", "-d", "x'); DROP TABLE pairs;--", "-q", "q?", "-a", "a."], "not a valid name", None),
    "question too long": (["add", "-d", "cs", "-q", "q" * 2001, "-a", "a."], "over the limit of 2000", None),
    "changed answer without --replace": (["add", "-d", "biology", "-q", Q, "-a", "Another."], "--replace", None),
    "SQL as a hash prefix": (["show", "'; DROP TABLE pairs; --"], "not a hash prefix", None),
    "unknown hash": (["remove", "ffffffffffff"], "no pair has a hash", None),
    "YAML that would run code": (["--config", "{tmp}/evil.yaml", "list"], "not valid YAML", None),
    "config with an unknown key": (["--config", "{tmp}/unknown.yaml", "list"], "unknown key 'model.sauce'", None),
    "missing config": (["--config", "{tmp}/none.yaml", "list"], "does not exist", None),
    "damaged database file": (["--home", "{tmp}/garbage_home", "list"], "is damaged", None),
    "query file without a query": (["query", "--file", "{tmp}/queries.jsonl"], ":2: needs a non-empty 'query'", None),
    "export of an unknown domain": (["export", "--domain", "nope"], "no domain named", None),
    "import of a foreign .pth": (["import", "{tmp}/foreign.pth"], "not a kvdb knowledge cache", None),
    "import of a trapped torch file": (["import", "{tmp}/cache_zip.pth"], "not a safe kvdb cache", None),
    "import of a trapped raw pickle": (["import", "{tmp}/cache_raw.pth"], "not a readable kvdb cache", None),
    "train --cache trapped": (["train", "--cache", "{tmp}/cache_trojan.pth", "--out", "{tmp}/out"],
                              "not a safe kvdb cache", None),
    "query --cache trapped": (["query", "--cache", "{tmp}/cache_raw.pth", Q], "not a readable kvdb cache", None),
    "query --cache trapped --generate": (["query", "--cache", "{tmp}/cache_trojan.pth", "--generate", Q],
                                         "not a safe kvdb cache", None),
    "query --generate --draft trapped": (["query", "--generate", "--draft", "{tmp}/checkpoint_raw.pth", Q],
                                         "not a kvdb draft checkpoint", None),
    "bench --draft trapped": (["bench", "--draft", "{tmp}/checkpoint_trojan.pth", "--per-workload", "1", "-n", "4"],
                              "not a kvdb draft checkpoint", None),
    "train --resume from a trapped checkpoint": (["train", "--resume", "--epochs", "1"], "not a kvdb draft checkpoint",
                                                 _plant_checkpoint),
    "doctor finds a trapped checkpoint": (["doctor"], "1 problem(s) found", _plant_checkpoint),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_ends_in_one_sentence(kv: Kvdb, tmp_path, case):
    sentinel = tmp_path / "PWNED"
    _bad_files(tmp_path, kv.home, sentinel)
    args, needle, setup = BAD_INPUTS[case]
    if setup is not None:
        setup(tmp_path, kv.home)
    args = [a.replace("{tmp}", str(tmp_path)) if isinstance(a, str) else a for a in args]
    before = sorted(pair_hashes(kv.home))
    res = subprocess.run(kvdb_cmd(*args), env=kvdb_env(kv.home, kv.config), capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert res.returncode > 0, (res.returncode, res.stderr[-2000:])
    line = one_error_line(res.stderr)
    assert needle in line, line
    assert not sentinel.exists(), "planted code ran"
    assert sorted(pair_hashes(kv.home)) == before


def test_debug_shows_the_traceback(kv: Kvdb, tmp_path):
    sentinel = tmp_path / "PWNED"
    trap = trapped_pth(tmp_path, "cache", "zip", sentinel, kv.home)
    res = run_kvdb(kv.home, kv.config, "--debug", "import", str(trap))
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr and "ForeignFileError" in res.stderr
    assert not sentinel.exists()
    env = {**kvdb_env(kv.home, kv.config), "KVDB_DEBUG": "1"}
    res = subprocess.run(kvdb_cmd("show", "zz!"), env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode != 0 and "Traceback" in res.stderr and "ValidationError" in res.stderr
