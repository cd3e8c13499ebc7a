"""`torchrun --nproc-per-node 2 -m kvdb build|train` (2 CPU processes over gloo) on a tiny random Llama, against the
single-process commands on copies of the same home.

Build: the distributed store holds byte-identical vectors (same token ids, answer starts, blobs, checksums) and
embeddings, every pair built once, both ranks did a share, one report and one index written by rank 0.
Train: the same held-out metrics (tolerance below), checkpoints in the single-process format written by rank 0
alone. A probe (a ``sitecustomize`` on the subprocesses' path) logs every atomic file write with its rank.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from tests.conftest import Kvdb, write_jsonl
from tests.tiny import make_model, write_tiny_config

ROOT = Path(__file__).resolve().parent.parent
N_PAIRS = 12

SECTIONS = {"index": {"rerank": False}}

# Every atomic file write (kvdb.fileio.atomic_path: checkpoints, log, plot, hash cache; and the
# index's own) logged with the writer's rank.
PROBE = """import os
if os.environ.get("KVDB_WRITE_PROBE"):
    import contextlib
    import kvdb.fileio as _f
    _inner = _f.atomic_path

    @contextlib.contextmanager
    def atomic_path(path):
        with _inner(path) as tmp:
            yield tmp
        with open(os.environ["KVDB_WRITE_PROBE"], "a") as log:
            log.write(f"{os.environ.get('RANK', '-')} {path}\\n")

    _f.atomic_path = atomic_path
    import kvdb.index as _i
    _inner_index = _i._atomic_write

    def _atomic_write(path, write):
        _inner_index(path, write)
        with open(os.environ["KVDB_WRITE_PROBE"], "a") as log:
            log.write(f"{os.environ.get('RANK', '-')} {path}\\n")

    _i._atomic_write = _atomic_write
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(config, pairs file, probe folder)."""
    root = tmp_path_factory.mktemp("dist")
    model = make_model(root / "llama", layers=4, hidden=64)
    cfg = write_tiny_config(root / "kvdb.yaml", model, **SECTIONS)
    # Every fifth pair of the default set (all seven domains), with their question variants (embedded too).
    text = resources.files("kvdb").joinpath("data/default_faq.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()][::5][:N_PAIRS]
    probe = root / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    return cfg, write_jsonl(root / "pairs.jsonl", rows), probe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(home: Path, cfg: Path, probe: Path, writes: Path, *args: str, ok: bool = True):
    """`torchrun --nproc-per-node 2 -m kvdb --home HOME --config CFG ARGS --json`; returns the one JSON printed
    (with ``ok=False``: the failed process, checked to have failed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVDB_", "RANK", "WORLD_SIZE", "LOCAL_",
                                                                      "MASTER_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(probe), str(ROOT)]), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               KVDB_WRITE_PROBE=str(writes))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "kvdb", "--home", str(home), "--config", str(cfg), *args, "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if not ok:
        assert proc.returncode != 0, proc.stdout
        return proc
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)  # exactly one document: rank 1 prints nothing


def _writers(writes: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in writes.read_text().splitlines() if writes.exists() else []:
        rank, path = line.split(" ", 1)
        out.setdefault(rank, set()).add(Path(path).name)
    return out


def _rows(home: Path, query: str) -> list[tuple]:
    with sqlite3.connect(home / "kvdb.sqlite") as conn:
        return conn.execute(query).fetchall()


VECTORS = "select pair_hash, fingerprint, layers, num_tokens, answer_start, data, checksum from pair_vectors " \
          "order by pair_hash"
EMBEDDINGS = "select pair_hash, embedder, dim, data, checksum from embeddings order by pair_hash"


@pytest.fixture(scope="module")
def homes(setup, tmp_path_factory) -> tuple[Path, Path, dict, dict, Path]:
    """One home built by one process, one by torchrun: (single, distributed, their reports, write log)."""
    cfg, pairs, probe = setup
    root = tmp_path_factory.mktemp("homes")
    single, dist = root / "single", root / "dist"
    for home in (single, dist):
        Kvdb(home, cfg)("add", "--file", str(pairs))
    one = Kvdb(single, cfg).json("build")
    writes = root / "build-writes.log"
    two = torchrun(dist, cfg, probe, writes, "build")
    return single, dist, one, two, writes


def test_distributed_build_equals_single_process(homes):
    single, dist, one, two, writes = homes
    # Same vectors, byte for byte: token ids, answer starts, layers and every hidden state (the blob and checksum).
    vectors = _rows(dist, VECTORS)
    assert len(vectors) == N_PAIRS and vectors == _rows(single, VECTORS)
    embeddings = _rows(dist, EMBEDDINGS)
    assert len(embeddings) == N_PAIRS and embeddings == _rows(single, EMBEDDINGS)
    # Every pair built once, by one of the ranks; both ranks had a share; the report sums them.
    assert two["built"] == two["embedded"] == N_PAIRS and two["failed"] == 0 and two["skipped"] == 0
    assert two["tokens"] == one["tokens"] and "ranks" not in one
    assert len(two["ranks"]) == 2 and all(r["built"] > 0 for r in two["ranks"])
    assert sum(r["built"] for r in two["ranks"]) == N_PAIRS
    assert sum(r["tokens"] for r in two["ranks"]) == two["tokens"]
    # Rank 0 alone rebuilt (and wrote) the index, after every rank had written.
    assert two["indexed_pairs"] == N_PAIRS
    who = _writers(writes)
    assert set(who) == {"0"} and who["0"], who


def test_distributed_build_is_incremental(homes, setup, tmp_path):
    _, dist, _, _, _ = homes
    cfg, _, probe = setup
    home = tmp_path / "home"
    shutil.copytree(dist, home)
    Kvdb(home, cfg)("add", "--domain", "extra", "-q", "What is a distributed build?",
                    "-a", "Ranks prefill shares of the pairs and write them to one store.")
    again = torchrun(home, cfg, probe, tmp_path / "writes.log", "build")
    assert again["built"] == 1 and again["skipped"] == N_PAIRS
    assert sorted(r["built"] for r in again["ranks"]) == [0, 1]
    assert len(_rows(home, VECTORS)) == N_PAIRS + 1


def test_distributed_training_matches_single_process(homes, setup, tmp_path):
    """Tolerance: the optimiser takes the same steps on the same global batches; only the order of float sums
    differs (DDP's all-reduce), so held-out top-1 agreement must agree within 0.02 and weights within 1e-4."""
    single_built, _, _, _, _ = homes
    cfg, _, probe = setup
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(single_built, a)
    shutil.copytree(single_built, b)
    # --no-variants: 9 training questions in batches of 4 -> the last batch (1 question) leaves rank 1 without one.
    args = ("train", "--epochs", "2", "--no-variants")
    one = Kvdb(a, cfg).json(*args)
    writes = tmp_path / "train-writes.log"
    two = torchrun(b, cfg, probe, writes, *args)
    assert two["ranks"] == 2 and two["epochs_run"] == 2 and two["data"]["train_examples"] == 9
    assert abs(two["metrics"]["top1_agreement"] - one["metrics"]["top1_agreement"]) <= 0.02
    assert two["untrained_early_exit"] == one["untrained_early_exit"]  # evaluation sharded, then gathered
    assert abs(two["train_loss"] - one["train_loss"]) <= 0.02

    out_a, out_b = a / "checkpoints", b / "checkpoints"
    names = sorted(p.name for p in out_b.glob("*.pth"))
    assert names == sorted(p.name for p in out_a.glob("*.pth")) and "draft_model_last.pth" in names
    assert not list(out_b.glob(".*.tmp"))
    # Rank 0 alone wrote checkpoints, log, plot and the base answers; rank 1 wrote nothing.
    who = _writers(writes)
    assert set(who) == {"0"}, who
    assert set(names) | {"train_log.json", "train_curves.png"} <= who["0"]
    for name in names:
        ca = torch.load(out_a / name, weights_only=True)
        cb = torch.load(out_b / name, weights_only=True)
        assert sorted(ca) == sorted(cb) and ca["epoch"] == cb["epoch"]
        assert list(cb["state_dict"]) == list(ca["state_dict"])  # no "module." prefix: the same format
        assert not any(k.startswith("module.") for k in cb["state_dict"])
        for key, value in ca["state_dict"].items():
            assert torch.allclose(value.float(), cb["state_dict"][key].float(), atol=1e-4), key
    log = json.loads((out_b / "train_log.json").read_text())
    assert log["training"]["ranks"] == 2 and [e["epoch"] for e in log["epochs"]] == [1, 2]


def test_rank_batches_split_the_single_process_batches():
    from kvdb.train import rank_batches

    single = rank_batches(9, 4, seed=3)
    assert [w for _, w in single] == [1.0, 1.0, 1.0]
    ranks = [rank_batches(9, 4, seed=3, rank=r, world=2) for r in range(2)]
    for i, (full, _) in enumerate(single):
        parts = [ranks[r][i] for r in range(2)]
        real = [p for p, w in parts if w]
        assert sorted(j for p in real for j in p) == sorted(full)  # each example once, on one rank
        # DDP averages the ranks' gradients: weights world * share / batch make that the batch's example mean.
        assert all(w == 2 * len(p) / len(full) for p, w in parts if w)
        assert sum(w for _, w in parts) / 2 == 1.0
    assert ranks[1][-1] == (single[-1][0][:1], 0.0)  # the 1-example last batch: rank 1 runs it with weight 0


def test_balanced_assignment():
    from kvdb.distributed import assign

    costs = [10, 1, 1, 1, 7, 2]
    owner = assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert owner == assign(costs, 2) and sorted(loads) == [11, 11]
    assert assign(costs, 1) == [0] * len(costs)


@pytest.mark.parametrize(("env", "message"), [
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 and WORLD_SIZE=2 do not fit"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT not set"),
])
def test_bad_torchrun_environment_is_one_line(kv, monkeypatch, env, message):
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = kv("build", ok=False)
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_a_failing_rank_stops_the_run_with_one_line_errors(setup, tmp_path):
    """Rank 0 fails on bad input (a missing model folder); rank 1, waiting for it, stops too instead of hanging, and
    each says what happened in one line."""
    _, _, probe = setup
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  source: {tmp_path / 'missing-model'}\n")
    proc = torchrun(tmp_path / "home", bad, probe, tmp_path / "writes.log", "build", ok=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert any("missing-model" in e and "is neither a folder" in e for e in errors), proc.stderr[-2000:]
    # Rank 1 says so in its own line, unless torchrun's SIGTERM (sent when rank 0 failed) came first.
    assert all(e.startswith(("Error: rank 1: ", "Error: model source")) for e in errors), errors
    assert all("another rank stopped" in e for e in errors if e.startswith("Error: rank 1: "))
