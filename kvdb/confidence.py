"""How sure retrieval is that the store answers a question: a logistic calibrator over features of the fused
candidates that mean the same on any FAQ set: the best pair's cosine and lexical score, its margins to the runner-up
in the fused and the dense lists, whether dense and lexical search agree on it, and the best lexical score and its
margin whichever pair has it.

The raw best fused score alone separates answerable from unanswerable questions poorly: a paraphrase with no word in
common with its pair scores like an off-topic question that happens to share words with some pair. The margins and
the agreement of the two searches tell those apart. The weights are fitted on held-out questions by
benchmarks/fit_confidence.py and shipped in kvdb/data/confidence.json with the operating point (the probability at
which ``confident`` turns true); they belong to the embedder they were fitted with (all-MiniLM-L6-v2) and to the
lexical weight of the fusion. Another embedder's cosines spread differently, so an embedder kvdb ships (e.g.
all-mpnet-base-v2) has its own fit in kvdb/data/confidence-<embedder name>.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources

import numpy as np

from kvdb.errors import ConfigError

log = logging.getLogger(__name__)

FEATURES = ("cosine", "lexical", "fused_margin", "dense_margin", "agree", "lexical_best", "lexical_margin")
CALIBRATION_FILE = "data/confidence.json"  # the default embedder's (all-MiniLM-L6-v2)


def calibration_file(embedder: str) -> str:
    """Where kvdb ships the calibration fitted with ``embedder`` (its display name), if it ships one."""
    return f"data/confidence-{embedder}.json"


def fused_ranking(cos: dict[int, float], lex: dict[int, float], weight: float) -> list[tuple[int, float]]:
    """(pair id, cosine + ``weight`` * lexical score), best first: the fusion retrieval ranks candidates by."""
    scores = {pid: c + weight * lex.get(pid, 0.0) for pid, c in cos.items()}
    return sorted(scores.items(), key=lambda kv: -kv[1])


def features(cos: dict[int, float], lex: dict[int, float], weight: float) -> np.ndarray:
    """The calibrator's inputs for one query from its candidates: ``cos`` (pair -> best-field cosine, every
    candidate) and ``lex`` (pair -> lexical score in [0, 1), those the full-text search found)."""
    out = np.zeros(len(FEATURES), dtype=np.float64)
    if not cos:
        return out
    fused = fused_ranking(cos, lex, weight)
    top = fused[0][0]
    dense = sorted(cos.values(), reverse=True)
    others = [c for p, c in cos.items() if p != top]
    out[0] = cos[top]
    out[1] = lex.get(top, 0.0)
    out[2] = fused[0][1] - (fused[1][1] if len(fused) > 1 else 0.0)
    out[3] = cos[top] - (max(others) if others else 0.0)
    out[4] = float(bool(lex) and max(lex, key=lex.get) == top and dense[0] == cos[top])
    best_lex = sorted(lex.values(), reverse=True)[:2] + [0.0, 0.0]
    out[5] = best_lex[0]
    out[6] = best_lex[0] - best_lex[1]
    return out


def operating_point(unanswerable: np.ndarray, rate: float) -> float:
    """The lowest threshold (confident when a score reaches it) at which at most ``rate`` of the ``unanswerable``
    questions' scores pass: just above the score of the one ranked ``floor(rate * n)`` (0-based, highest first), so
    that exactly the ones above it pass; -inf when all of them may."""
    scores = np.sort(np.asarray(unanswerable, dtype=np.float64))[::-1]
    allowed = int(np.floor(rate * scores.size + 1e-9))
    if allowed >= scores.size:
        return -np.inf
    return float(np.nextafter(scores[allowed], np.inf))


def logistic(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


@dataclass(frozen=True)
class Calibrator:
    """p(the best candidate answers the question) = logistic(bias + coef . the ``uses`` features)."""

    uses: tuple[str, ...]  # names from FEATURES, in their order
    coef: tuple[float, ...]
    bias: float
    threshold: float  # the operating point: confident when p >= threshold
    lexical_weight: float  # the fusion weight the features were computed with
    embedder: str  # the embedder's name the weights were fitted with

    def columns(self) -> list[int]:
        return [FEATURES.index(name) for name in self.uses]

    def probability(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for [n, len(FEATURES)] features (or one query's [len(FEATURES)])."""
        x = np.asarray(x, dtype=np.float64)
        return logistic(self.bias + x[..., self.columns()] @ np.asarray(self.coef))

    def as_dict(self) -> dict:
        return {"features": list(self.uses), "coef": list(self.coef), "bias": self.bias, "threshold": self.threshold,
                "lexical_weight": self.lexical_weight, "embedder": self.embedder}

    @classmethod
    def from_dict(cls, d: dict) -> Calibrator:
        uses = tuple(d.get("features") or ())
        unknown = [name for name in uses if name not in FEATURES]
        if not uses or unknown or len(d.get("coef", ())) != len(uses):
            raise ConfigError(f"the confidence calibration uses features {list(uses)} with {len(d.get('coef', ()))} "
                              f"weights; kvdb computes {list(FEATURES)}: refit it with benchmarks/fit_confidence.py")
        return cls(uses, tuple(float(c) for c in d["coef"]), float(d["bias"]), float(d["threshold"]),
                   float(d["lexical_weight"]), str(d["embedder"]))


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 50) -> tuple[np.ndarray, float]:
    """Logistic regression by Newton's method with an L2 penalty on the coefficients (not the bias); classes are
    weighted to count equally, so a set with few unanswerable questions still shapes the boundary."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    pos = max(y.sum(), 1.0)
    neg = max(n - y.sum(), 1.0)
    sample = np.where(y > 0, n / (2 * pos), n / (2 * neg))
    xb = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(d + 1)
    penalty = np.full(d + 1, l2 * n)
    penalty[-1] = 0.0
    for _ in range(steps):
        p = logistic(xb @ w)
        grad = xb.T @ (sample * (p - y)) + penalty * w
        hess = (xb * (sample * p * (1 - p))[:, None]).T @ xb + np.diag(penalty) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w[:-1], float(w[-1])


_SHIPPED: dict[str | None, Calibrator] = {}


def shipped(embedder: str | None = None) -> Calibrator:
    """The calibration shipped for ``embedder`` (kvdb/data/confidence-<name>.json), else the default embedder's
    (kvdb/data/confidence.json: its ``embedder`` then differs from the one asked for, which callers tell the user
    about), read once per name."""
    if embedder not in _SHIPPED:
        files = resources.files("kvdb")
        own = files.joinpath(calibration_file(embedder)) if embedder else None
        path = own if own is not None and own.is_file() else files.joinpath(CALIBRATION_FILE)
        calibrator = Calibrator.from_dict(json.loads(path.read_text(encoding="utf-8")))
        if embedder and calibrator.embedder != embedder:
            log.info("no confidence calibration shipped for the embedder %s; using %s's", embedder,
                     calibrator.embedder)
        _SHIPPED[embedder] = calibrator
    return _SHIPPED[embedder]
