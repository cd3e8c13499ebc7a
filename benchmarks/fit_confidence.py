"""Fit the calibrated ``confident`` (kvdb/confidence.py) on every FAQ set of benchmarks/retrieval_sets.py and write
kvdb/data/confidence.json: the logistic weights and the operating point.

    PYTHONPATH=. .venv/bin/python benchmarks/fit_confidence.py [--out kvdb/data/confidence.json]

A query is a positive when it is answerable and the fused search ranks its pair first (a confident wrong answer is
worse than no confident answer); unanswerable questions and misranked paraphrases are negatives. The operating point
is the lowest probability at which every set lets at most ``UNANSWERABLE_PASS`` of its unanswerable questions
through, which aims at the 5% goal on sets not seen here. benchmarks/eval_retrieval.py measures the same fit held
out (fitted without the set, or the fold, it reports).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from kvdb.confidence import FEATURES, Calibrator, features, fit, fused_ranking  # noqa: E402
from kvdb.confidence import operating_point as unanswerable_point  # noqa: E402
from kvdb.fileio import atomic_write_bytes  # noqa: E402
from retrieval_sets import Row  # noqa: E402

UNANSWERABLE_PASS = 0.025
L2 = 1e-3
# The features the shipped calibration uses: the best pair's cosine alone. Margins and lexical scores separate the
# default set's questions a little better but depend on the store (how alike its pairs are, its size through BM25's
# IDF): fitted on the default set they miss most questions of the construction FAQ asked verbatim
# (benchmarks/eval_retrieval.py, "calibrated (all features)").
SHIPPED = ("cosine",)


def fused_top(row: Row, weight: float) -> str | None:
    ranking = fused_ranking(row.cos, row.lex, weight)
    return ranking[0][0] if ranking else None


def design(rows: list[Row], weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(features, label) per row: label 1 for an answerable query whose pair the fused search ranks first."""
    x = np.array([features(r.cos, r.lex, weight) for r in rows])
    y = np.array([r.answerable and fused_top(r, weight) == r.gold for r in rows], dtype=np.float64)
    return x, y


def operating_point(rows: list[Row], scores: np.ndarray) -> float:
    """The lowest score threshold at which each set of ``rows`` lets at most UNANSWERABLE_PASS of its unanswerable
    questions through."""
    return max((unanswerable_point([s for r, s in zip(rows, scores) if r.set == name and not r.answerable],
                                   UNANSWERABLE_PASS) for name in {r.set for r in rows}), default=-np.inf)


def train(rows: list[Row], weight: float, embedder: str, uses: tuple[str, ...] = SHIPPED) -> Calibrator:
    x, y = design(rows, weight)
    cols = [FEATURES.index(name) for name in uses]
    coef, bias = fit(x[:, cols], y, L2)
    calibrator = Calibrator(uses, tuple(float(c) for c in coef), bias, 0.5, weight, embedder)
    threshold = operating_point(rows, calibrator.probability(x))
    return replace(calibrator, threshold=min(max(threshold, 0.0), 1.0))


def main() -> None:
    from retrieval_sets import all_sets, collect, prepare

    from kvdb.retrieve import Retriever

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "kvdb" / "data" / "confidence.json"))
    ap.add_argument("--features", default=",".join(SHIPPED), help=f"comma-separated, of {', '.join(FEATURES)}")
    args = ap.parse_args()
    rows: list[Row] = []
    weight, embedder = None, None
    for faq in all_sets():
        rt = prepare(faq)
        retriever = Retriever(rt.config, rt.home, rt.store, rerank=False)
        weight, embedder = rt.config.index.lexical_weight, retriever.ref.name
        rows += collect(retriever, faq)
    calibrator = train(rows, weight, embedder, tuple(args.features.split(",")))
    atomic_write_bytes(Path(args.out), (json.dumps(calibrator.as_dict(), indent=2) + "\n").encode())
    print(json.dumps(calibrator.as_dict(), indent=2))


if __name__ == "__main__":
    main()
