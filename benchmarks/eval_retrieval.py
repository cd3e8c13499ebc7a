"""Retrieval quality and speed on the default set: dense alone, lexical alone, fused, fused + base-model re-rank.

    .venv/bin/python benchmarks/eval_retrieval.py [--home DIR] [--rerank] [--json] [--out FILE]

For each method: recall@1/@5 on all and on hard paraphrases (no content word shared with the stored question), and
how often answerable paraphrases and unanswerable questions are called confident. Every confident figure is held
out: the queries are split in two folds by the pair they ask about (unanswerable ones alternately), the threshold
(and, for "fused (cv)", the lexical weight) is chosen on one fold and counted on the other, and the two folds'
counts are added. The threshold lets at most 2.5% of a fold's unanswerable questions through, which aims at the
5% goal on unseen data. Latency is per query in process (one query at a time, models loaded and index warm).
The "threshold (all)" column is the threshold fitted on every query: the figure to put in the config.

The home is prepared (default set loaded and built) if needed. No public FAQ or paraphrase set ships inside a PyPI
package we could find, so the default set is the only one measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvdb.build import Builder  # noqa: E402
from kvdb.examples import load_examples  # noqa: E402
from kvdb.retrieve import Retriever  # noqa: E402
from kvdb.runtime import Runtime  # noqa: E402

DATA = ROOT / "kvdb" / "data"
DEPTH = 20  # candidates from each list, as index.fusion_candidates
RERANK_CANDIDATES = 5
WEIGHTS = (0.1, 0.2, 0.3, 0.5, 0.8)
UNANSWERABLE_PASS = 0.025


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Row:
    """One query's candidates (pair question -> cosine, lexical score, PMI) and what it should find."""

    kind: str
    gold: str | None
    fold: int
    cos: dict[str, float]
    lex: dict[str, float]
    pmi: dict[str, float]


def folds(items: list[dict]) -> list[int]:
    """Fold 0 or 1 per query: by the pair a paraphrase asks about, alternately for unanswerable ones."""
    sources = sorted({it["source_question"] for it in items if it.get("source_question")})
    of = {q: i % 2 for i, q in enumerate(sources)}
    out, n_una = [], 0
    for it in items:
        if it.get("source_question"):
            out.append(of[it["source_question"]])
        else:
            out.append(n_una % 2)
            n_una += 1
    return out


def collect(retriever: Retriever, items: list[dict], reranker) -> list[Row]:
    index = retriever.index()
    rows = []
    for item, fold in zip(items, folds(items)):
        q = item["query"]
        vectors = retriever.embedder().embed([q])
        (dense,) = retriever.dense(index, vectors, DEPTH, None)
        (lex,) = retriever.lexical([q], DEPTH, None)
        cos = {**dense, **retriever._cosines(index, vectors, [p for p in lex if p not in dense])}
        names = retriever._pairs(set(cos))
        pmi = {}
        if reranker is not None:  # re-rank the fused top candidates at the configured weight
            w = retriever.config.index.lexical_weight
            top = sorted(cos, key=lambda p: -(cos[p] + w * lex.get(p, 0.0)))[:RERANK_CANDIDATES]
            cond, null = reranker.score(q, [names[p].answer for p in top])
            pmi = {names[p].question: float(c - null) for p, c in zip(top, cond)}
        rows.append(Row(item["kind"], item.get("source_question"), fold,
                        {names[p].question: c for p, c in cos.items()},
                        {names[p].question: s for p, s in lex.items()}, pmi))
    return rows


def ranked(row: Row, method: str, w: float) -> list[tuple[str, float]]:
    if method == "dense":
        scores = dict(row.cos)
    elif method == "lexical":
        scores = dict(row.lex)
    else:
        scores = {q: c + w * row.lex.get(q, 0.0) for q, c in row.cos.items()}
        if method == "rerank":
            top = sorted(scores, key=lambda q: -scores[q])[:RERANK_CANDIDATES]
            scores = {q: scores[q] + 0.5 * row.pmi.get(q, 0.0) for q in top}
    return sorted(scores.items(), key=lambda kv: -kv[1])


def best(row: Row, method: str, w: float) -> float:
    r = ranked(row, method, w)
    return r[0][1] if r else 0.0


def threshold(rows: list[Row], method: str, w: float) -> float:
    una = [best(r, method, w) for r in rows if r.kind == "unanswerable"]
    return float(np.quantile(una, 1 - UNANSWERABLE_PASS)) + 1e-6


def recall(rows: list[Row], method: str, w: float, kind: str | None, at: int) -> float:
    hits = [r.gold in [q for q, _ in ranked(r, method, w)[:at]] for r in rows
            if r.kind != "unanswerable" and (kind is None or r.kind == kind)]
    return float(np.mean(hits)) if hits else float("nan")


def choose_weight(rows: list[Row]) -> float:
    """The lexical weight with the best recall@1 (ties: most answerable confident) on ``rows``."""
    def merit(w: float) -> tuple[float, float]:
        t = threshold(rows, "fused", w)
        par = [best(r, "fused", w) >= t for r in rows if r.kind != "unanswerable"]
        return recall(rows, "fused", w, None, 1), float(np.mean(par))
    return max(WEIGHTS, key=merit)


def evaluate(rows: list[Row], method: str, w: float | None) -> dict:
    """Recall on every query; confident rates held out (threshold and, when ``w`` is None, weight from the other
    fold)."""
    conf_par, conf_una, used = [], [], []
    for fold in (0, 1):
        train = [r for r in rows if r.fold != fold]
        test = [r for r in rows if r.fold == fold]
        wf = choose_weight(train) if w is None else w
        used.append(wf)
        t = threshold(train, method, wf)
        conf_par += [best(r, method, wf) >= t for r in test if r.kind != "unanswerable"]
        conf_una += [best(r, method, wf) >= t for r in test if r.kind == "unanswerable"]
    w_all = choose_weight(rows) if w is None else w
    return {
        "weight": w_all,
        "recall@1": recall(rows, method, w_all, None, 1),
        "recall@5": recall(rows, method, w_all, None, 5),
        "recall@1_hard": recall(rows, method, w_all, "hard", 1),
        "recall@5_hard": recall(rows, method, w_all, "hard", 5),
        "paraphrases_confident": float(np.mean(conf_par)),
        "unanswerable_confident": float(np.mean(conf_una)),
        "threshold (all)": threshold(rows, method, w_all),
    }


def latencies(rt: Runtime, items: list[dict], lm, n_rerank: int) -> dict[str, float]:
    """Milliseconds per query, one query at a time, for each method's search path."""
    plain = Retriever(rt.config, rt.home, rt.store, rerank=False)
    index = plain.index()
    plain.search([items[0]["query"]], 5)  # loads the embedder, warms the index
    qs = [it["query"] for it in items]

    def per_query(fn, queries) -> float:
        t = time.perf_counter()
        for q in queries:
            fn(q)
        return 1000 * (time.perf_counter() - t) / len(queries)

    out = {
        "dense": per_query(lambda q: plain.dense(index, plain.embedder().embed([q]), 5, None), qs),
        "lexical": per_query(lambda q: plain.lexical([q], 5, None), qs),
        "fused": per_query(lambda q: plain.search([q], 5), qs),
    }
    if lm is not None and n_rerank:
        reranking = Retriever(rt.config, rt.home, rt.store, rerank=True, lm=lm, embedder=plain.embedder())
        reranking.search([qs[0]], 5)
        out["rerank"] = per_query(lambda q: reranking.search([q], 5), qs[:n_rerank])
    t = time.perf_counter()
    plain.search(qs, 5)
    out["fused, one batch of all"] = 1000 * (time.perf_counter() - t) / len(qs)
    return out


METHODS = [("dense alone", "dense", 0.0), ("lexical alone", "lexical", 0.0)] + \
    [(f"fused w={w}", "fused", w) for w in WEIGHTS] + [("fused (cv weight)", "fused", None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=None, help="kvdb home (default: a temporary one)")
    ap.add_argument("--rerank", action="store_true", help="also measure fused + base-model re-rank (slow)")
    ap.add_argument("--rerank-latency-queries", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    home = args.home or tempfile.mkdtemp(prefix="kvdb-eval-")
    rt = Runtime.open(home)
    load_examples(rt.store, rt.config.store)
    builder = Builder(rt.config, rt.home, rt.store)
    builder.run(progress=False)
    lm = builder.lm() if args.rerank else None
    reranker = None
    if lm is not None:
        from kvdb.rerank import LMReranker

        reranker = LMReranker(lm)
    items = load_jsonl(DATA / "paraphrases.jsonl") + load_jsonl(DATA / "unanswerable.jsonl")
    rows = collect(Retriever(rt.config, rt.home, rt.store, rerank=False), items, reranker)
    methods = METHODS + ([("fused + re-rank", "rerank", rt.config.index.lexical_weight)] if reranker else [])
    results = {name: evaluate(rows, method, w) for name, method, w in methods}
    timing = latencies(rt, items, lm, args.rerank_latency_queries)
    doc = {"queries": len(rows), "latency_ms": timing, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{len(rows)} queries; ms per query: " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()))
    cols = ["weight", "recall@1", "recall@5", "recall@1_hard", "recall@5_hard", "paraphrases_confident",
            "unanswerable_confident", "threshold (all)"]
    print("| method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
