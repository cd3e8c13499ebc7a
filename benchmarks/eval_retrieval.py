"""Retrieval quality and speed on every FAQ set of benchmarks/retrieval_sets.py: dense alone, lexical alone, fused,
fused with the calibrated confidence, and (``--rerank``, on the sets of ``--rerank-sets``) fused + base-model re-rank.

    PYTHONPATH=. .venv/bin/python benchmarks/eval_retrieval.py [--rerank [--rerank-sets default,stackfaq]] [--json]
        [--out FILE] [--png FILE]

Per set and method: recall@1/@5 on all answerable queries and on hard paraphrases (no content word shared with the
stored question), and how many answerable and unanswerable queries are called confident. Every confident figure is
held out: the threshold (and the calibrator's weights) are fitted without the queries counted. A set with answerable
queries is split in two folds by the pair a paraphrase asks about (unanswerable ones alternately); a fold is scored
by a fit on the other fold plus every set of another source. A set of unanswerable questions only is scored by a fit
on the sets of other sources alone. The threshold lets at most 2.5% of each training set's unanswerable questions
through, aiming at the 5% goal on unseen data. ``threshold (all)`` is the fit on every set: what the config or
kvdb/data/confidence.json holds. The fusion's lexical weight is held out too: each set is reported at the weight of
``--lexical-weights`` with the best mean recall@1 on the sets of other sources (``lexical_weight`` in each result);
``lexical_weight (all sets)`` is the choice on every set, what the config should hold. Latency is per query in
process, one query at a time, models loaded, index warm.

The PNG plots, for every set with answerable and unanswerable questions, answerable kept against unanswerable
rejected as the threshold moves (held-out scores), for the shipped calibration (the best pair's cosine), a
calibration on every feature of kvdb/confidence.py and the raw fused score, each with its held-out operating point
marked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fit_confidence import SHIPPED, design, operating_point, train  # noqa: E402
from retrieval_sets import FaqSet, Row, all_sets, collect, prepare  # noqa: E402

from kvdb.confidence import FEATURES, fused_ranking  # noqa: E402
from kvdb.retrieve import Retriever  # noqa: E402
from kvdb.runtime import Runtime  # noqa: E402

RERANK_CANDIDATES = 5
RERANK_WEIGHT = 0.5
# Sets whose queries come from one source: none is fitted on another of its family when it is reported.
FAMILY = {"default": "default", "construction": "construction", "default-offtopic": "construction",
          "stackfaq": "stackfaq", "stackfaq-half": "stackfaq"}
METHODS = ("dense", "lexical", "fused", "calibrated", "calibrated (all features)")
LEXICAL_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5)  # the fusion weights each set's is chosen from, on the other sets


def ranked(row: Row, method: str, w: float) -> list[tuple[str, float]]:
    if method == "dense":
        scores = dict(row.cos)
    elif method == "lexical":
        scores = dict(row.lex)
    else:
        fused = fused_ranking(row.cos, row.lex, w)
        if method != "rerank":
            return fused
        scores = {q: s + RERANK_WEIGHT * row.pmi.get(q, 0.0) for q, s in fused[:RERANK_CANDIDATES]}
    return sorted(scores.items(), key=lambda kv: -kv[1])


def recall(rows: list[Row], method: str, w: float, kind: str | None, at: int) -> float | None:
    hits = [r.gold in [q for q, _ in ranked(r, method, w)[:at]] for r in rows
            if r.answerable and (kind is None or r.kind == kind)]
    return float(np.mean(hits)) if hits else None


def scores(rows: list[Row], method: str, w: float, train_rows: list[Row], embedder: str) -> np.ndarray:
    """Each row's confidence score under ``method``: the best score, or the probability of a calibrator fitted on
    ``train_rows``."""
    if method.startswith("calibrated"):
        x, _ = design(rows, w)
        return train(train_rows, w, embedder, FEATURES if "all" in method else SHIPPED).probability(x)
    return np.array([(ranked(r, method, w) or [("", 0.0)])[0][1] for r in rows])


def held_out(by_set: dict[str, list[Row]], name: str, method: str, w: float,
             embedder: str) -> tuple[list[Row], np.ndarray, np.ndarray]:
    """(rows, held-out score, held-out threshold) of set ``name``, as the module docstring describes."""
    others = [r for s, rows in by_set.items() if FAMILY[s] != FAMILY[name] for r in rows]
    rows = by_set[name]
    if not any(r.answerable for r in rows):
        s = scores(rows, method, w, others, embedder)
        t = operating_point(others, scores(others, method, w, others, embedder))
        return rows, s, np.full(len(rows), t)
    out_rows, out_s, out_t = [], [], []
    for fold in (0, 1):
        fit_rows = [r for r in rows if r.fold != fold] + others
        test = [r for r in rows if r.fold == fold]
        out_rows += test
        out_s.append(scores(test, method, w, fit_rows, embedder))
        out_t.append(np.full(len(test), operating_point(fit_rows, scores(fit_rows, method, w, fit_rows, embedder))))
    return out_rows, np.concatenate(out_s), np.concatenate(out_t)


def evaluate(by_set: dict[str, list[Row]], name: str, method: str, w: float, embedder: str) -> dict:
    rows, s, t = held_out(by_set, name, method, w, embedder)
    conf = s >= t
    ans = np.array([r.answerable for r in rows])
    every = [r for rs in by_set.values() for r in rs]
    rank = "fused" if method.startswith("calibrated") else method
    return {
        "recall@1": recall(rows, rank, w, None, 1),
        "recall@5": recall(rows, rank, w, None, 5),
        "recall@1_hard": recall(rows, rank, w, "hard", 1),
        "recall@5_hard": recall(rows, rank, w, "hard", 5),
        "paraphrases_confident": float(conf[ans].mean()) if ans.any() else None,
        "unanswerable_confident": float(conf[~ans].mean()) if (~ans).any() else None,
        "threshold (all)": operating_point(every, scores(every, method, w, every, embedder)),
    }


def chosen_weight(by_set: dict[str, list[Row]], name: str, grid: list[float]) -> float:
    """The lexical weight of ``grid`` with the best mean fused recall@1 over the sets of other sources that have
    answerable questions (every set's for ``name`` None): a set is never reported at a weight chosen on it."""
    others = [s for s, rows in by_set.items()
              if (name is None or FAMILY[s] != FAMILY[name]) and any(r.answerable for r in rows)]
    if not others:
        return grid[0]
    return max(grid, key=lambda w: np.mean([recall(by_set[s], "fused", w, None, 1) for s in others]))


def curve(rows: list[Row], s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unanswerable rejected, answerable kept) for every threshold."""
    ans = np.array([r.answerable for r in rows])
    ts = np.concatenate([[-np.inf], np.unique(s), [np.inf]])
    return np.array([(s[~ans] < t).mean() for t in ts]), np.array([(s[ans] >= t).mean() for t in ts])


def plot(by_set: dict[str, list[Row]], weights: dict[str, float], embedder: str, path: Path) -> None:
    """One panel per set with both answerable and unanswerable questions: answerable kept against unanswerable
    rejected as the threshold moves (held-out scores), each rule's held-out operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, rows in by_set.items() if any(r.answerable for r in rows) and not all(r.answerable for r in rows)]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method, label in (("calibrated", "calibrated (cosine, shipped)"), ("calibrated (all features)",
                              "calibrated (all features)"), ("fused", "raw fused score")):
            rows, s, t = held_out(by_set, name, method, weights[name], embedder)
            x, y = curve(rows, s)
            line, = ax.plot(x, y, label=f"{label} (held out)")
            ans = np.array([r.answerable for r in rows])
            conf = s >= t
            ax.plot([1 - conf[~ans].mean()], [conf[ans].mean()], "o", color=line.get_color(),
                    label=f"{label}: operating point")
        ax.axvline(0.95, color="grey", ls=":", label="5% unanswerable let through")
        ax.axhline(0.80, color="grey", ls="--", label="goal: 80% answerable kept")
        ax.set_xlabel("unanswerable questions rejected (not confident)")
        ax.set_ylabel("answerable questions kept (confident)")
        ax.set_title(f"kvdb confident, {name} (held out)")
        ax.set_xlim(0, 1.01)
        ax.set_ylim(0, 1.01)
        ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def latencies(rt: Runtime, faq: FaqSet, lm, n_rerank: int) -> dict[str, float]:
    """Milliseconds per query, one query at a time, for each method's search path."""
    plain = Retriever(rt.config, rt.home, rt.store, rerank=False)
    index = plain.index()
    qs = [it["query"] for it in faq.queries]
    plain.search([qs[0]], 5)  # loads the embedder, warms the index

    def per_query(fn, queries) -> float:
        t = time.perf_counter()
        for q in queries:
            fn(q)
        return 1000 * (time.perf_counter() - t) / len(queries)

    out = {
        "embed": per_query(lambda q: plain.embedder().embed([q]), qs),
        "dense": per_query(lambda q: plain.dense(index, plain.embedder().embed([q]), 5, None), qs),
        "lexical": per_query(lambda q: plain.lexical([q], 20, None), qs),
        "search (fused, calibrated)": per_query(lambda q: plain.search([q], 5), qs),
    }
    if lm is not None and n_rerank:
        reranking = Retriever(rt.config, rt.home, rt.store, rerank=True, lm=lm, embedder=plain.embedder())
        reranking.search([qs[0]], 5)
        out["rerank"] = per_query(lambda q: reranking.search([q], 5), qs[:n_rerank])
    t = time.perf_counter()
    plain.search(qs, 5)
    out["search, one batch of all"] = 1000 * (time.perf_counter() - t) / len(qs)
    return out


def reranker_for(rt: Runtime):
    from kvdb.build import Builder
    from kvdb.rerank import LMReranker

    lm = Builder(rt.config, rt.home, rt.store).lm()
    return lm, LMReranker(lm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rerank", action="store_true", help="also measure fused + base-model re-rank (slow)")
    ap.add_argument("--rerank-sets", default="default",
                    help="comma-separated sets to re-rank (about a second a query on 2 cores)")
    ap.add_argument("--rerank-latency-queries", type=int, default=20)
    ap.add_argument("--lexical-weights", default=",".join(map(str, LEXICAL_WEIGHTS)),
                    help="the fusion weights each set's is chosen from, on the other sets")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--png", default=None, help="write the confident curve here")
    args = ap.parse_args()
    rerank_sets = set(args.rerank_sets.split(","))
    by_set: dict[str, list[Row]] = {}
    timing, queries, pairs = {}, {}, {}
    for faq in all_sets():
        rt = prepare(faq)
        retriever = Retriever(rt.config, rt.home, rt.store, rerank=False)
        w, embedder = rt.config.index.lexical_weight, retriever.ref.name
        lm, reranker = reranker_for(rt) if args.rerank and faq.name in rerank_sets else (None, None)
        by_set[faq.name] = collect(retriever, faq, reranker, RERANK_CANDIDATES)
        queries[faq.name], pairs[faq.name] = len(faq.queries), len(faq.pairs)
        if faq.name == "default":
            timing = latencies(rt, faq, lm, args.rerank_latency_queries)
    methods = METHODS + (("rerank",) if args.rerank else ())
    grid = [float(x) for x in args.lexical_weights.split(",")]
    weights = {name: chosen_weight(by_set, name, grid) for name in by_set}
    results = {name: {m: {**evaluate(by_set, name, m, weights[name], embedder), "lexical_weight": weights[name]}
                      for m in methods if m != "rerank" or name in rerank_sets} for name in by_set}
    doc = {"sets": {n: {"pairs": pairs[n], "queries": queries[n]} for n in by_set},
           "lexical_weight (all sets)": chosen_weight(by_set, None, grid), "configured_lexical_weight": w,
           "latency_ms": timing, "load_average": os.getloadavg(), "results": results}
    if args.png:
        plot(by_set, weights, embedder, Path(args.png))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print("ms per query (default set): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items())
          + f"; load average {doc['load_average'][0]:.2f}")
    cols = ["recall@1", "recall@5", "recall@1_hard", "recall@5_hard", "paraphrases_confident",
            "unanswerable_confident", "threshold (all)"]
    print("| set | method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for name, by_method in results.items():
        for m, r in by_method.items():
            print(f"| {name} | {m} | " + " | ".join("-" if r[c] is None else f"{r[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
