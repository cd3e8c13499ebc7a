"""Counts for `kvdb stats`."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import func, select, text

from kvdb.config import Home
from kvdb.store.db import Store
from kvdb.store.models import BaseAnswer, Domain, Embedding, ModelInfo, Pair, PairVectors


def store_stats(store: Store, home: Home) -> dict[str, Any]:
    with store.read() as session:
        pairs = session.scalar(select(func.count(Pair.id))) or 0
        domains = session.scalar(select(func.count(Domain.id))) or 0
        models = [
            {"fingerprint": fp, "name": name, "pairs_built": n or 0, "tokens": int(t or 0), "bytes": int(b or 0)}
            for fp, name, n, t, b in session.execute(
                select(
                    ModelInfo.fingerprint,
                    ModelInfo.name,
                    func.count(PairVectors.id),
                    func.sum(PairVectors.num_tokens),
                    func.sum(func.length(PairVectors.data)),
                )
                .outerjoin(PairVectors, PairVectors.fingerprint == ModelInfo.fingerprint)
                .group_by(ModelInfo.fingerprint)
            ).all()
        ]
        embeddings = [
            {"embedder": e, "count": n}
            for e, n in session.execute(select(Embedding.embedder, func.count(Embedding.id)).group_by(Embedding.embedder))
        ]
        answers = session.scalar(select(func.count(BaseAnswer.id))) or 0
        revision = store.revision(session)
        size = 0
        if store.is_postgres:  # the whole database on the server: tables, indexes, TOASTed blobs
            size = int(session.scalar(text("SELECT pg_database_size(current_database())")) or 0)
    if store.is_sqlite and store.where and os.path.exists(store.where):
        size = sum(os.path.getsize(p) for p in (store.where, store.where + "-wal") if os.path.exists(p))
    return {
        "home": str(home.root),
        "database": store.where,
        "backend": store.backend,
        "schema_revision": store.current_revision(),
        "pairs": pairs,
        "domains": domains,
        "models": models,
        "embeddings": embeddings,
        "base_answers": answers,
        "store_revision": revision,
        "database_bytes": size,
    }
