"""Retrieval benchmark for kvdb.index: build time, single-query latency, recall@k and memory per index kind.

Synthetic vectors are clustered like sentence embeddings rather than uniform on the sphere: a mixture of gaussian
centres with uneven cluster sizes and spreads, L2-normalised. Queries come from the same mixture but are not in the
index. Recall is measured against the flat (exact) index.

    .venv/bin/python benchmarks/bench_retrieval.py --sizes 1000,100000 --dim 384 --queries 200
    .venv/bin/python benchmarks/bench_retrieval.py --sizes 1000000 --json > bench.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvdb.index import FAISS_FILE, IndexSpec, VectorIndex  # noqa: E402

_GEN_CHUNK = 65536


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; elsewhere the peak, which only bounds it)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class Mixture:
    """Gaussian mixture on the unit sphere, shaped like sentence embeddings of questions on many topics.

    Centres are random directions with uneven weights and per-centre spreads. The noise around a centre has a
    power-law spectrum (variance of the i-th principal direction proportional to i**-decay, in a random basis), as
    real embeddings concentrate their variance in a few dozen directions; decay=0 gives isotropic noise, whose
    near-ties in 384 dimensions make any approximate index look worse than it does on real data.
    """

    def __init__(self, centres: int, dim: int, spread: float, decay: float, rng: np.random.Generator) -> None:
        c = rng.standard_normal((centres, dim), dtype=np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        weights = rng.gamma(2.0, size=centres)
        self.weights = weights / weights.sum()
        # The noise norm is about spread, so a point's cosine to its centre is about 1/sqrt(1+spread^2).
        self.scales = (rng.uniform(0.6, 1.4, size=centres) * spread).astype(np.float32)
        variance = np.arange(1, dim + 1, dtype=np.float64) ** -decay
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        # Rows of `mix` are the principal directions scaled by their standard deviation (total variance 1).
        self.mix = (np.sqrt(variance / variance.sum())[:, None] * basis.T).astype(np.float32)
        self.dim = dim

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, _GEN_CHUNK):
            m = min(_GEN_CHUNK, n - start)
            label = rng.choice(len(self.weights), size=m, p=self.weights)
            block = rng.standard_normal((m, self.dim), dtype=np.float32) @ self.mix
            block *= self.scales[label, None]
            block += self.centres[label]
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start:start + m] = block
        return out


def percentile_ms(seconds: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, p))


def recall_at(results: list[list[tuple[int, float]]], truth: np.ndarray, k: int) -> float:
    hits = [len({i for i, _ in row} & set(t[:k].tolist())) for row, t in zip(results, truth)]
    return float(np.mean(hits)) / k


def bench_kind(kind: str, spec: IndexSpec, ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int,
               truth: np.ndarray | None, persist: bool) -> tuple[dict, np.ndarray]:
    gc.collect()
    rss0 = current_rss()
    t0 = time.perf_counter()
    index = VectorIndex.build(ids, x, spec, {"bench": True})
    build_s = time.perf_counter() - t0
    rss_delta = current_rss() - rss0

    index.search(q[:5], k)  # warm caches and faiss's thread pool before timing
    latencies = []
    cpu = []  # CPU time of the calling thread: unlike wall time, not inflated when other processes share the cores
    results = []
    for i in range(q.shape[0]):
        c = time.thread_time()
        t = time.perf_counter()
        row = index.search(q[i:i + 1], k)[0]
        latencies.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
        results.append(row)
    # The exact answer comes from the flat index's own batch search when flat is the kind being measured.
    if truth is None:
        truth = np.array([[i for i, _ in row] + [-1] * (k - len(row)) for row in index.search(q, k)])
    row = {
        "kind": kind,
        "built_kind": index.kind,
        "build_s": round(build_s, 3),
        "p50_ms": round(percentile_ms(latencies, 50), 3),
        "p99_ms": round(percentile_ms(latencies, 99), 3),
        "cpu_p50_ms": round(percentile_ms(cpu, 50), 3),
        f"recall_at_{k}": round(recall_at(results, truth, k), 4),
        "rss_delta_mb": round(rss_delta / 2**20, 1),
    }
    if persist:
        with tempfile.TemporaryDirectory(prefix="kvdb-bench-") as tmp:
            t = time.perf_counter()
            index.save(Path(tmp))
            row["save_s"] = round(time.perf_counter() - t, 3)
            row["serialized_mb"] = round((Path(tmp) / FAISS_FILE).stat().st_size / 2**20, 1)
            probe = index.search(q[:20], k)
            del index
            gc.collect()
            t = time.perf_counter()
            loaded = VectorIndex.load(Path(tmp))
            row["load_s"] = round(time.perf_counter() - t, 3)
            row["load_identical"] = loaded is not None and loaded.search(q[:20], k) == probe
            del loaded
    else:
        del index
    gc.collect()
    return row, truth


def main(argv: list[str] | None = None) -> int:
    defaults = IndexSpec()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,100000,1000000", help="comma-separated index sizes")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="flat,hnsw,ivf", help="comma-separated subset of flat,hnsw,ivf")
    ap.add_argument("--centres", type=int, default=1000, help="gaussian centres in the synthetic mixture")
    ap.add_argument("--spread", type=float, default=1.0,
                    help="noise norm around a centre (1.0: cosine to the centre about 0.7)")
    ap.add_argument("--decay", type=float, default=1.0,
                    help="power-law decay of the noise spectrum (0: isotropic, the hardest case)")
    ap.add_argument("--hnsw-m", type=int, default=defaults.hnsw_m)
    ap.add_argument("--hnsw-ef-search", type=int, default=defaults.hnsw_ef_search)
    ap.add_argument("--hnsw-ef-construction", type=int, default=defaults.hnsw_ef_construction)
    ap.add_argument("--ivf-nlist", type=int, default=None, help="default: about 4*sqrt(n)")
    ap.add_argument("--ivf-nprobe", type=int, default=defaults.ivf_nprobe)
    ap.add_argument("--no-persist", action="store_true", help="skip the save/load round trip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    kinds = [s for s in args.kinds.split(",") if s]
    if "flat" in kinds:  # measured first: its answers are the recall reference
        kinds = ["flat"] + [s for s in kinds if s != "flat"]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rng = np.random.default_rng(args.seed)
    mixture = Mixture(args.centres, args.dim, args.spread, args.decay, rng)
    q = mixture.sample(args.queries, rng)
    rows = []
    for n in sizes:
        t = time.perf_counter()
        x = mixture.sample(n, rng)
        ids = np.arange(n, dtype=np.int64)
        log(f"n={n}: generated {n}x{args.dim} in {time.perf_counter() - t:.1f}s")
        truth = None
        if "flat" not in kinds:
            exact = VectorIndex.build(ids, x, IndexSpec(kind="flat"), {})
            truth = np.array([[i for i, _ in row] for row in exact.search(q, args.k)])
            del exact
        for kind in kinds:
            spec = IndexSpec(kind=kind, hnsw_m=args.hnsw_m, hnsw_ef_search=args.hnsw_ef_search,
                             hnsw_ef_construction=args.hnsw_ef_construction, ivf_nlist=args.ivf_nlist,
                             ivf_nprobe=args.ivf_nprobe)
            row, truth = bench_kind(kind, spec, ids, x, q, args.k, truth, not args.no_persist)
            row["n"] = n
            rows.append(row)
            log(f"n={n} {kind}: {row}")
        del x, ids
        gc.collect()

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dim": args.dim, "queries": args.queries, "k": args.k, "centres": args.centres, "spread": args.spread,
        "decay": args.decay,
        "spec": {"hnsw_m": args.hnsw_m, "hnsw_ef_search": args.hnsw_ef_search,
                 "hnsw_ef_construction": args.hnsw_ef_construction, "ivf_nlist": args.ivf_nlist,
                 "ivf_nprobe": args.ivf_nprobe},
        "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "peak_rss_mb": round(peak_rss() / 2**20, 1),
        "results": rows,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    cols = ["n", "kind", "built_kind", "build_s", "p50_ms", "p99_ms", "cpu_p50_ms", f"recall_at_{args.k}", "rss_delta_mb",
            "serialized_mb", "save_s", "load_s"]
    table = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print(f"dim={args.dim} queries={args.queries} k={args.k} centres={args.centres} spread={args.spread} "
          f"decay={args.decay} "
          f"faiss={faiss.__version__} threads={faiss.omp_get_max_threads()}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths)))
    print(f"peak RSS {report['peak_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
