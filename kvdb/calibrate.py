"""Choose ``confident``'s operating point for one store from questions its users ask (``kvdb calibrate``).

The shipped operating point (kvdb/data/confidence.json) holds every FAQ set kvdb was measured on to 2.5% of its
unanswerable questions called confident, so the hardest of them (near twins of stored questions) set it, and it is
cautious on stores whose users rarely ask such twins (README, "Retrieval"). Given a store's own labelled questions,
``report`` finds the lowest ``index.min_confidence`` that calls at most ``target`` of its unanswerable questions
confident and says how many of its answerable ones that keeps, beside the same figures at the point in force.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kvdb.confidence import operating_point
from kvdb.errors import ValidationError
from kvdb.retrieve import QueryResult

MIN_HASH_PREFIX = 8


@dataclass(frozen=True)
class Labelled:
    """A question and what it should find: the stored question, or the pair's hash (or a prefix of at least
    MIN_HASH_PREFIX characters); ``expect`` None for a question the store does not answer."""

    query: str
    expect: str | None

    def found(self, result: QueryResult) -> bool:
        """Whether the best match is the expected pair."""
        if self.expect is None or not result.matches:
            return False
        top = result.matches[0]
        return top.question == self.expect or (len(self.expect) >= MIN_HASH_PREFIX and top.hash.startswith(self.expect))


@dataclass(frozen=True)
class Point:
    min_confidence: float
    answerable_confident: float  # share of answerable questions called confident with their pair first
    unanswerable_confident: float  # share of unanswerable questions called confident


@dataclass(frozen=True)
class CalibrationReport:
    target: float  # the most unanswerable questions that may be called confident, as a share
    answerable: int
    unanswerable: int
    recall_at_1: float  # share of answerable questions whose pair ranks first, whatever the point
    chosen: Point  # the lowest point that keeps to the target
    current: Point  # the point in force (config index.min_confidence, else the shipped one)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse(items: Iterable[tuple[str, Any]]) -> list[Labelled]:
    """Labelled questions from (where, object) pairs: ``{"query", "question"}`` or ``{"query", "hash"}`` for a
    question the store answers, ``{"query", "answerable": false}`` for one it does not. ``where`` names the item in
    errors (a file and line)."""
    out = []
    for where, obj in items:
        query = obj.get("query") if isinstance(obj, dict) else None
        if not isinstance(query, str) or not query.strip():
            raise ValidationError(f"{where}: needs a non-empty 'query' field")
        expect = obj.get("question", obj.get("hash"))
        if obj.get("answerable", True) is False:
            out.append(Labelled(query, None))
        elif isinstance(expect, str) and expect.strip():
            out.append(Labelled(query, expect.strip()))
        else:
            raise ValidationError(f"{where}: needs the stored 'question' (or 'hash') it should find, or "
                                  "\"answerable\": false")
    return out


def _point(threshold: float, p: np.ndarray, found: np.ndarray, answerable: np.ndarray) -> Point:
    confident = p >= threshold
    return Point(round(float(threshold), 6), float((confident & found)[answerable].mean()),
                 float(confident[~answerable].mean()))


def report(labelled: Sequence[Labelled], results: Sequence[QueryResult], target: float,
           current: float) -> CalibrationReport:
    """The operating points for ``labelled`` questions, given their search ``results`` (each with the calibrated
    probability ``confidence``) and the point ``current`` in force."""
    if not 0 <= target < 1:
        raise ValidationError(f"the target share of unanswerable questions must be in [0, 1), not {target}")
    answerable = np.array([item.expect is not None for item in labelled], dtype=bool)
    if not answerable.any() or answerable.all():
        raise ValidationError(f"calibrating needs answerable and unanswerable questions; got {int(answerable.sum())} "
                              f"answerable and {int((~answerable).sum())} unanswerable")
    p = np.array([r.confidence for r in results], dtype=np.float64)
    found = np.array([item.found(r) for item, r in zip(labelled, results)])
    # Rounded up to the 4 decimals a user copies into the config: rounding down could let one more through.
    chosen = min(max(math.ceil(operating_point(p[~answerable], target) * 10_000) / 10_000, 0.0), 1.0)
    return CalibrationReport(target, int(answerable.sum()), int((~answerable).sum()), float(found[answerable].mean()),
                             _point(chosen, p, found, answerable), _point(current, p, found, answerable))
