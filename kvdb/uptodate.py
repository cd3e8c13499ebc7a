"""Is there anything for `kvdb build` to do? Answered from the store and the index's description alone.

Nothing here imports torch, transformers or faiss: importing them costs seconds, a no-op build of a large store
costs a few counting queries. The index is trusted when its description names the store's current revision and the
configured embedder and its file has the size it records; a damaged index is still caught and rebuilt by the first
query that loads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, select

from kvdb.config import Home
from kvdb.identity import resolve_embedder, resolve_model
from kvdb.store.models import Embedding, Pair, PairVectors
from kvdb.store.pairs import domain_id

FAISS_FILE = "index.faiss"
META_FILE = "index.json"


def index_dir(home: Home, embedder_key: str) -> Path:
    """The folder holding the index of one embedder's vectors."""
    return home.index_dir / re.sub(r"[^A-Za-z0-9_.-]+", "_", embedder_key)


def fresh_index_pairs(home: Home, embedder_key: str, revision: int) -> int | None:
    """The number of pairs the saved index covers if it is current for ``revision``; ``None`` if it must be rebuilt."""
    folder = index_dir(home, embedder_key)
    try:
        doc = json.loads((folder / META_FILE).read_text("utf-8"))
        size = (folder / FAISS_FILE).stat().st_size
    except (OSError, ValueError):
        return None
    meta = doc.get("meta") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or meta.get("revision") != revision or meta.get("embedder") != embedder_key:
        return None
    if doc.get("faiss_bytes") != size:
        return None
    pairs = meta.get("pairs", 0)
    return pairs if isinstance(pairs, int) else None


def nothing_to_build(runtime, domain: str | None) -> dict[str, Any] | None:
    """The report of a build that has nothing to do, or ``None`` when some pair lacks vectors or an embedding for
    the configured model and embedder, or the index is stale."""
    model = resolve_model(runtime.config.model, runtime.home)
    embedder = resolve_embedder(runtime.config.embedder, runtime.home, model.fingerprint)
    store = runtime.store
    with store.read() as session:
        scope = select(func.count(Pair.id))
        if domain is not None:
            scope = scope.where(Pair.domain_id == domain_id(session, domain))
        missing_vectors = session.scalar(
            scope.outerjoin(PairVectors, and_(PairVectors.pair_hash == Pair.hash,
                                              PairVectors.fingerprint == model.fingerprint))
            .where(PairVectors.id.is_(None)))
        if missing_vectors:
            return None
        missing_embeddings = session.scalar(
            scope.outerjoin(Embedding, and_(Embedding.pair_hash == Pair.hash, Embedding.embedder == embedder.key))
            .where(Embedding.id.is_(None)))
        if missing_embeddings:
            return None
        total = session.scalar(scope) or 0
        revision = store.revision(session)
    indexed = fresh_index_pairs(runtime.home, embedder.key, revision)
    if indexed is None:
        return None
    return {"built": 0, "embedded": 0, "skipped": total, "failed": 0, "tokens": 0, "seconds": 0.0, "failures": [],
            "model": model.name, "embedder": embedder.key, "tokens_per_second": 0.0, "indexed_pairs": indexed}
