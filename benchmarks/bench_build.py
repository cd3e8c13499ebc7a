"""Build benchmarks: `kvdb build` throughput against the raw batched forward pass of the same model on the same
sequences in the same run, storage per token against the fp16 size of the kept vectors, a no-op rebuild of 10k pairs,
and query-embedding latency (the part of retrieval latency that is not the index; see bench_retrieval.py).

    .venv/bin/python benchmarks/bench_build.py [--pairs-noop 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, insert, select  # noqa: E402

from kvdb.build import Builder, PairText, pair_sequence, resolve_layers  # noqa: E402
from kvdb.examples import load_examples  # noqa: E402
from kvdb.lm import pad_right  # noqa: E402
from kvdb.runtime import Runtime  # noqa: E402
from kvdb.store.blobs import pack  # noqa: E402
from kvdb.store.models import Domain, Embedding, ModelInfo, Pair, PairVectors  # noqa: E402


@torch.inference_mode()
def raw_forward_tokens_per_s(lm, seqs, batch: int, repeats: int = 2) -> float:
    """The physical limit: the decoder alone over the same length-sorted padded batches, nothing kept."""
    seqs = sorted(seqs, key=len)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = 0
        for i in range(0, len(seqs), batch):
            group = seqs[i : i + batch]
            ids, mask = pad_right(group, 0)
            lm.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            tokens += sum(map(len, group))
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def bench_build(home: Path) -> dict:
    rt = Runtime.open(home)
    load_examples(rt.store, rt.config.store)
    builder = Builder(rt.config, rt.home, rt.store)
    lm = builder.lm()  # load (and convert) outside the timings
    builder.embedder()
    with rt.store.read() as s:
        pairs = [PairText(p.hash, p.question, p.answer, []) for p in s.scalars(select(Pair))]
    seqs = [pair_sequence(lm, p).ids for p in pairs]
    batch = rt.config.build.batch_size
    raw = raw_forward_tokens_per_s(lm, seqs, batch)
    layers = resolve_layers(rt.config.build.layers, lm.num_layers)
    report = builder.run(rebuild=True, progress=False)
    build_tps = report.tokens / report.seconds
    # Storage: bytes in pair_vectors blobs and the database file, against the fp16 size of the kept vectors.
    with rt.store.read() as s:
        blob_bytes = s.scalar(select(func.sum(func.length(PairVectors.data))))
        tokens = s.scalar(select(func.sum(PairVectors.num_tokens)))
    fp16 = tokens * len(layers) * lm.hidden_size * 2
    db_bytes = os.path.getsize(rt.store.where) + (os.path.getsize(rt.store.where + "-wal")
                                                   if os.path.exists(rt.store.where + "-wal") else 0)
    return {"pairs": len(pairs), "tokens": report.tokens, "batch_size": batch,
            "raw_forward_tokens_per_s": raw, "build_tokens_per_s": build_tps, "build_vs_raw": build_tps / raw,
            "blob_bytes_per_fp16_byte": blob_bytes / fp16, "db_bytes_per_fp16_byte": db_bytes / fp16,
            "embedded_pairs": report.embedded}


def bench_noop(home: Path, n: int) -> dict:
    """A store of n built pairs (synthetic small vectors under the real fingerprints); time a build that has nothing
    to do, in-process and as a command."""
    rt = Runtime.open(home)
    builder = Builder(rt.config, rt.home, rt.store)
    fp, key = builder.model_ref.fingerprint, builder.embedder_ref.key
    data, digest = pack({"token_ids": torch.zeros(4, dtype=torch.int32), "layer_3": torch.zeros(4, 8).half()})
    emb, emb_digest = pack({"question": torch.zeros(1, 8), "answer": torch.zeros(1, 8)})
    with rt.store.write() as s:
        s.add(Domain(name="synthetic", description=""))
        s.flush()
        did = s.scalar(select(Domain.id).where(Domain.name == "synthetic"))
        if s.get(ModelInfo, fp) is None:
            s.add(ModelInfo(fingerprint=fp, name="bench", source="bench", hidden_size=8, num_layers=3, info={}))
        rows = [{"hash": f"{i:064x}", "domain_id": did, "question": f"q{i}", "answer": f"a{i}",
                 "question_key": f"{i:064x}", "meta": {}} for i in range(n)]
        s.execute(insert(Pair), rows)
        s.execute(insert(PairVectors), [{"pair_hash": r["hash"], "fingerprint": fp, "layers": [3], "num_tokens": 4,
                                         "answer_start": 2, "data": data, "checksum": digest} for r in rows])
        s.execute(insert(Embedding), [{"pair_hash": r["hash"], "embedder": key, "dim": 8, "data": emb,
                                       "checksum": emb_digest} for r in rows])
    t0 = time.perf_counter()
    report = Builder(rt.config, rt.home, rt.store).run(progress=False)
    in_process = time.perf_counter() - t0
    assert report.built == 0 and report.skipped == n, report
    env = {**os.environ, "KVDB_HOME": str(home)}
    kvdb = [sys.executable, "-m", "kvdb"]
    subprocess.run([*kvdb, "build"], env=env, check=True, capture_output=True)  # first run builds the index
    t0 = time.perf_counter()
    subprocess.run([*kvdb, "build"], env=env, check=True, capture_output=True)
    command = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([*kvdb, "--version"], env=env, check=True, capture_output=True)
    startup = time.perf_counter() - t0
    return {"pairs": n, "noop_build_in_process_s": in_process, "noop_build_command_s": command,
            "python_startup_s": startup}


def bench_query_embedding(home: Path, repeats: int = 50) -> dict:
    from kvdb.embed import load_embedder
    from kvdb.identity import resolve_embedder

    rt = Runtime.open(home)
    embedder = load_embedder(resolve_embedder(rt.config.embedder, rt.home), rt.config.embedder)
    query = "What procedure finds a minimum by taking small steps along the steepest downward slope?"
    embedder.embed([query])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        embedder.embed([query])
        times.append(time.perf_counter() - t0)
    return {"query_embedding_p50_ms": 1000 * float(np.median(times)),
            "query_embedding_p99_ms": 1000 * float(np.quantile(times, 0.99)), "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs-noop", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvdb-bench-") as tmp:
        models = Path(tmp) / "a" / "models"
        shared = ROOT / "var" / "models"  # reuse a converted model if `make demo` made one
        if shared.is_dir():
            models.parent.mkdir(parents=True)
            os.symlink(shared, models)
        result = {"build": bench_build(Path(tmp) / "a"), "noop": bench_noop(Path(tmp) / "b", args.pairs_noop),
                  "query_embedding": bench_query_embedding(Path(tmp) / "a")}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    b, n, q = result["build"], result["noop"], result["query_embedding"]
    print(f"build: {b['pairs']} pairs, {b['tokens']} tokens, batch {b['batch_size']}")
    print(f"  raw batched forward  {b['raw_forward_tokens_per_s']:8.0f} tokens/s")
    print(f"  kvdb build           {b['build_tokens_per_s']:8.0f} tokens/s  ({b['build_vs_raw']:.2f}x of raw)")
    print(f"  storage: blobs {b['blob_bytes_per_fp16_byte']:.3f}x, whole database {b['db_bytes_per_fp16_byte']:.3f}x"
          " of the fp16 vectors kept")
    print(f"no-op build of {n['pairs']} pairs: {n['noop_build_in_process_s']:.3f} s in process, "
          f"{n['noop_build_command_s']:.2f} s as a command (python start-up alone {n['python_startup_s']:.2f} s)")
    print(f"query embedding: p50 {q['query_embedding_p50_ms']:.1f} ms, p99 {q['query_embedding_p99_ms']:.1f} ms "
          f"({q['torch_threads']} threads)")


if __name__ == "__main__":
    main()
