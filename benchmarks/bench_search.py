"""The default query path (MiniLM embedding, FAISS, the store's full-text search, fusion, calibrated confidence) at
10k and 100k pairs, in process, one query at a time; each phase timed alone as well.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_search.py [--sizes 10000,100000] [--queries 200] [--json]

Pairs are synthetic: questions and answers drawn from the words of the default set and its paraphrases with a
Zipf-like frequency (so common query words match many pairs, as in a real store), embeddings random unit vectors
(the dense results are meaningless, their cost is not). The queries are the default set's paraphrases, embedded by
the real MiniLM. The machine's load average is reported with the figures: on a shared machine they are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from retrieval_sets import default_set  # noqa: E402

from kvdb.build import Builder  # noqa: E402
from kvdb.lexical import terms  # noqa: E402
from kvdb.retrieve import Retriever  # noqa: E402
from kvdb.runtime import Runtime  # noqa: E402
from kvdb.store.pairs import PairInput, add_pairs  # noqa: E402

CHUNK = 5000


def vocabulary() -> list[str]:
    faq = default_set()
    text = " ".join([p["question"] + " " + p["answer"] for p in faq.pairs] + [q["query"] for q in faq.queries])
    words = sorted({w for w in terms(text)})
    return words


def synthetic_pairs(n: int, words: list[str], rng: np.random.Generator) -> list[PairInput]:
    p = 1.0 / np.arange(1, len(words) + 1)
    p = p / p.sum()
    order = rng.permutation(len(words))

    def sentence(k: int) -> str:
        return " ".join(words[order[i]] for i in rng.choice(len(words), size=k, p=p))

    return [PairInput("synthetic", f"{sentence(int(rng.integers(5, 12)))} {i}?", sentence(int(rng.integers(20, 50))))
            for i in range(n)]


def fill(rt: Runtime, n: int, dim: int, rng: np.random.Generator) -> None:
    """``n`` synthetic pairs with random question and answer embeddings, CHUNK per transaction."""
    words = vocabulary()
    builder = Builder(rt.config, rt.home, rt.store)
    for start in range(0, n, CHUNK):
        add_pairs(rt.store, synthetic_pairs(min(CHUNK, n - start), words, rng), rt.config.store,
                  descriptions={"synthetic": "synthetic pairs"})
    with rt.store.read() as session:
        _, need, _ = builder.plan(session, None, False)
    for start in range(0, len(need), CHUNK):
        chunk = need[start : start + CHUNK]
        vecs = rng.standard_normal((len(chunk), 2, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=-1, keepdims=True)
        builder._write(chunk, {}, {p.hash: {"question": v[:1], "answer": v[1:]} for p, v in zip(chunk, vecs)}, False)


def per_query_ms(fn, queries: list[str]) -> dict[str, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    ms = 1000 * np.asarray(times)
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def bench(n: int, queries: list[str], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rt = Runtime.open(tempfile.mkdtemp(prefix=f"kvdb-bench-search-{n}-"))
    retriever = Retriever(rt.config, rt.home, rt.store, rerank=False)
    dim = retriever.embedder().dim
    t = time.perf_counter()
    fill(rt, n, dim, rng)
    filled = time.perf_counter() - t
    t = time.perf_counter()
    index = retriever.index()
    indexed = time.perf_counter() - t
    retriever.search(queries[:1], 5)
    depth = rt.config.index.fusion_candidates
    vectors = {q: retriever.embedder().embed([q]) for q in queries}
    return {
        "pairs": n, "index": index.kind, "fill_s": filled, "index_s": indexed,
        "embed": per_query_ms(lambda q: retriever.embedder().embed([q]), queries),
        "dense": per_query_ms(lambda q: retriever.dense(index, vectors[q], depth, None), queries),
        "lexical": per_query_ms(lambda q: retriever.lexical([q], depth, None), queries),
        "search without the embedding": per_query_ms(
            lambda q: retriever.candidates(index, [q], vectors[q], depth, None, None), queries),
        "search": per_query_ms(lambda q: retriever.search([q], 5), queries),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the goal is stated for 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    queries = [q["query"] for q in default_set().queries][: args.queries]
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        results.append({**bench(n, queries, args.seed), "load_average": os.getloadavg()})
        r = results[-1]
        if not args.json:
            print(f"{n} pairs ({r['index']}; filled in {r['fill_s']:.0f} s, indexed in {r['index_s']:.1f} s; "
                  f"load average {r['load_average'][0]:.2f}):", flush=True)
            for phase in ("embed", "dense", "lexical", "search without the embedding", "search"):
                print(f"  {phase:30s} mean {r[phase]['mean']:7.2f} ms  p50 {r[phase]['p50']:7.2f}  "
                      f"p99 {r[phase]['p99']:7.2f}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
