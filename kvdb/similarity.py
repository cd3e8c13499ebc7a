"""`kvdb compare`: how close two texts are, the seed's compare_similarity done with the retrieval embedder plus a
token-overlap F1 (the SQuAD measure), so a generated answer can be scored against a reference."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from kvdb.config import Config, Home
from kvdb.embed import load_embedder
from kvdb.identity import resolve_embedder
from kvdb.errors import ValidationError

_TOKEN = re.compile(r"\w+", re.UNICODE)


def token_f1(a: str, b: str) -> float:
    ta, tb = _TOKEN.findall(a.lower()), _TOKEN.findall(b.lower())
    if not ta or not tb:
        return float(ta == tb)
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(ta), common / len(tb)
    return 2 * precision * recall / (precision + recall)


def compare_texts(config: Config, home: Home, a: str, b: str, embedder=None) -> dict[str, Any]:
    if not a.strip() or not b.strip():
        raise ValidationError("both texts must be non-empty")
    if embedder is None:
        if config.embedder.source == "base-mean":
            raise ValidationError("kvdb compare needs a text embedder; base-mean would load the whole base model")
        embedder = load_embedder(resolve_embedder(config.embedder, home), config.embedder, device=config.model.device)
    va, vb = embedder.embed([a, b])
    return {"cosine": float(va @ vb), "token_f1": token_f1(a, b), "exact": a == b, "embedder": embedder.key}
