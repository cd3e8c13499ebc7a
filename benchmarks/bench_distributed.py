"""Distributed build benchmark: `kvdb build` throughput (tokens/s) in one process against `torchrun
--nproc-per-node N`, on the same pairs (the default set, 70 pairs) with the default model, and whether the stored
vectors and embeddings are identical.

Each configuration builds its own copy of one home from scratch (`--rebuild` for repeats) and reports the build's own
figure (tokens / seconds of prefill, embedding and writes: `kvdb build --json`; under torchrun the slowest rank's
seconds) and the command's wall time (with interpreter start, model loading and the index). Configurations:
``1x<cores>``: one process with every core (torch's default threads); ``1x1``: one process, one thread;
``Nx<cores/N>``: torchrun, each rank with its share of the cores. Results go to benchmarks/results/ as JSON.

    .venv/bin/python benchmarks/bench_distributed.py [--nproc 2] [--repeat 2] [--models var/models]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _env(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVDB_", "OMP_NUM_THREADS", "RANK", "WORLD_SIZE",
                                                                      "LOCAL_RANK", "MASTER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kvdb(home: Path, args: list[str], nproc: int = 1, threads: int | None = None) -> tuple[dict, float]:
    """Run `kvdb --home HOME ARGS --json` (under torchrun when nproc > 1); (its JSON, wall seconds)."""
    head = [sys.executable, "-m", "kvdb"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
         str(_free_port()), "-m", "kvdb"]
    t0 = time.perf_counter()
    proc = subprocess.run([*head, "--home", str(home), *args, "--json"], env=_env(threads), capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"kvdb {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout), wall


def _rows(home: Path, query: str) -> dict[str, tuple]:
    with sqlite3.connect(home / "kvdb.sqlite") as conn:
        return {r[0]: tuple(r[1:]) for r in conn.execute(query)}


def compare(a: Path, b: Path) -> dict:
    """Vectors and embeddings of two homes: identical bytes, or how far apart (max |difference| of the tensors)."""
    from kvdb.store.blobs import unpack

    out = {}
    for table, query in (("vectors", "select pair_hash, num_tokens, answer_start, data, checksum from pair_vectors"),
                         ("embeddings", "select pair_hash, dim, data, checksum from embeddings")):
        ra, rb = _rows(a, query), _rows(b, query)
        same_keys = set(ra) == set(rb)
        equal = sum(1 for h in ra if ra[h] == rb.get(h))
        worst = 0.0
        same_shape = same_keys
        for h in ra:
            if h in rb and ra[h] != rb[h]:
                same_shape &= ra[h][:-2] == rb[h][:-2]  # token count, answer start (or dimension)
                ta, tb = unpack(ra[h][-2], ra[h][-1], h), unpack(rb[h][-2], rb[h][-1], h)
                for k in ta:
                    if ta[k].dtype.is_floating_point:
                        worst = max(worst, (ta[k].float() - tb[k].float()).abs().max().item())
                    else:
                        same_shape &= torch.equal(ta[k], tb[k])  # token ids
        out[table] = {"rows": len(ra), "identical": equal, "same_pairs_ids_and_starts": bool(same_shape),
                      "max_abs_difference": worst}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes [2]")
    ap.add_argument("--repeat", type=int, default=2, help="builds per configuration; the best is kept [2]")
    ap.add_argument("--models", type=Path, default=ROOT / "var" / "models",
                    help="a home's models/ folder to copy (skips converting the GGUF again) [var/models]")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_distributed.json")
    args = ap.parse_args()
    n = cores()
    configs = [(f"1x{n}", 1, None), ("1x1", 1, 1), (f"{args.nproc}x{max(1, n // args.nproc)}", args.nproc, None)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kvdb-bench-dist-") as tmp:
        template = Path(tmp) / "template"
        kvdb(template, ["init", "--examples"])
        if args.models.is_dir():
            shutil.copytree(args.models, template / "models", dirs_exist_ok=True)
        results = {}
        for name, nproc, threads in configs:
            home = Path(tmp) / name
            shutil.copytree(template, home)
            runs = []
            for i in range(args.repeat):
                report, wall = kvdb(home, ["build", *(["--rebuild"] if i else [])], nproc, threads)
                runs.append({"tokens": report["tokens"], "seconds": round(report["seconds"], 3),
                             "tokens_per_second": report["tokens_per_second"], "wall_seconds": round(wall, 2),
                             "built": report["built"], "ranks": report.get("ranks")})
                print(f"{name:>6} run {i + 1}: {report['built']} pairs, {report['tokens']} tokens, "
                      f"{report['tokens_per_second']:.0f} tokens/s, wall {wall:.1f}s", file=sys.stderr)
            best = max(runs, key=lambda r: r["tokens_per_second"])
            results[name] = {"processes": nproc, "threads_per_process": threads or (n if nproc == 1 else
                                                                                     max(1, n // nproc)),
                             "best_tokens_per_second": best["tokens_per_second"], "runs": runs}
        single, one_thread, dist = (results[c[0]] for c in configs)
        dist_home = Path(tmp) / configs[2][0]
        identity = {f"{configs[2][0]} vs {name}": compare(Path(tmp) / name, dist_home) for name, _, _ in configs[:2]}
    report = {
        "benchmark": "kvdb build, one process vs torchrun",
        "command": f"benchmarks/bench_distributed.py --nproc {args.nproc} --repeat {args.repeat}",
        "machine": {"cores": n, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "pairs": "default set (kvdb init --examples), default model and embedder",
        "configurations": results,
        "speedup_vs_one_process_all_cores": round(dist["best_tokens_per_second"] / single["best_tokens_per_second"], 3),
        "speedup_vs_one_process_one_thread": round(dist["best_tokens_per_second"] /
                                                   one_thread["best_tokens_per_second"], 3),
        "identical_vectors": identity,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("machine", "speedup_vs_one_process_all_cores",
                                              "speedup_vs_one_process_one_thread", "identical_vectors")}, indent=1))
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
