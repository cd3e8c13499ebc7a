"""Find pairs by meaning and by words: embed the query, search the FAISS index of the pairs' field embeddings, search
the store's full-text index (kvdb.lexical), and fuse the two per pair.

Each pair contributes several vectors (its question, its answer, its question variants if metadata has them), each
under the FAISS id ``pair_id * SLOTS + slot``; a pair's score is its best field score. Indexing the answer as well
as the question is what finds paraphrases that share no words with the stored question (measured in README).

The index lives under ``KVDB_HOME/index/<embedder>/`` and records the store revision it covers; when the store has
changed since (pairs added or removed, embeddings built), or the file is missing or corrupt, it is rebuilt from the
embeddings table, which is the source of truth.

Fusion is linear: a pair's score is its best-field cosine plus ``index.lexical_weight`` times its lexical score in
[0, 1). Unlike reciprocal-rank fusion it keeps a scale that means the same for every query. ``confident`` (the store
answers this query) is a calibrated probability from the candidates' scores (kvdb.confidence) reaching an operating
point, unless a score threshold is configured (``Retriever.confidence_rule``). The base-model re-rank (kvdb.rerank)
is opt-in (``index.rerank``): it costs a forward pass of the base model per query.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from kvdb.confidence import Calibrator, features, fused_ranking, shipped
from kvdb.config import Config, Home
from kvdb.embed import load_embedder
from kvdb.identity import EmbedderRef, resolve_embedder
from kvdb.errors import IndexCorruptError, NotBuiltError, ValidationError
from kvdb.index import IndexSpec, VectorIndex
from kvdb.store.blobs import unpack
from kvdb.store.db import Store
from kvdb.store.models import Domain, Embedding, Pair
from kvdb.store.pairs import domain_id
from kvdb.uptodate import index_dir

log = logging.getLogger(__name__)

SLOTS = 16  # slot 0: question, 1: answer, 2..15: question variants
FIELD_SLOTS = {"question": 0, "answer": 1}


@dataclass
class Match:
    hash: str
    domain: str
    question: str
    answer: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    pair_id: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"hash": self.hash, "domain": self.domain, "question": self.question, "answer": self.answer,
                "score": round(self.score, 6), "metadata": self.metadata}


@dataclass
class QueryResult:
    query: str
    confident: bool
    matches: list[Match]
    confidence: float | None = None  # calibrated probability that the store answers the query (kvdb.confidence)

    def as_dict(self) -> dict[str, Any]:
        return {"query": self.query, "confident": self.confident, "matches": [m.as_dict() for m in self.matches]}


def field_vectors(fields: dict[str, np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """(slot, vector) for each stored field of one pair."""
    out = []
    for name, vecs in fields.items():
        vecs = np.asarray(vecs, dtype=np.float32).reshape(-1, vecs.shape[-1])
        if name in FIELD_SLOTS:
            out.append((FIELD_SLOTS[name], vecs[0]))
        elif name == "variants":
            out += [(2 + i, v) for i, v in enumerate(vecs[: SLOTS - 2])]
    return out


def best_per_pair(hits: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
    """Field hits (faiss id, cosine) -> the k best (pair id, score), a pair scoring its best field."""
    best: dict[int, float] = {}
    for fid, score in hits:
        pid = fid // SLOTS
        if score > best.get(pid, -np.inf):
            best[pid] = score
    return sorted(best.items(), key=lambda kv: -kv[1])[:k]


def index_spec(config: Config) -> IndexSpec:
    return IndexSpec(kind=config.index.kind)


class Retriever:
    """Query embedding + index search over the store. Build once per process; reuse for many queries."""

    def __init__(self, config: Config, home: Home, store: Store, embedder=None, model_fingerprint: str | None = None,
                 lm=None, rerank: bool | None = None):
        self.config = config
        self._lm = lm
        self.rerank = config.index.rerank if rerank is None else rerank
        self._reranker = None
        self.home = home
        self.store = store
        if embedder is not None:
            self.ref: EmbedderRef = embedder.ref
        else:
            if model_fingerprint is None and config.embedder.source == "base-mean":
                from kvdb.identity import resolve_model

                model_fingerprint = resolve_model(config.model, home).fingerprint
            self.ref = resolve_embedder(config.embedder, home, model_fingerprint)
        self._embedder = embedder
        self._index: VectorIndex | None = None
        self._index_revision: int | None = None
        self.rebuilt = False
        self.notices: list[str] = []
        self._warned_calibration = False

    @property
    def index_dir(self):
        return index_dir(self.home, self.ref.key)

    def embedder(self):
        if self._embedder is None:
            self._embedder = load_embedder(self.ref, self.config.embedder, device=self.config.model.device)
        return self._embedder

    def reranker(self):
        if self._reranker is None:
            from kvdb.lm import load_model
            from kvdb.rerank import LMReranker

            if self._lm is None:
                self._lm = load_model(self.config.model, self.home)
            self._reranker = LMReranker(self._lm)
        return self._reranker

    # -- index lifecycle ------------------------------------------------------------------------------------------
    def index(self) -> VectorIndex:
        with self.store.read() as session:
            return self._index_at(self.store.revision(session))

    @contextmanager
    def _snapshot(self) -> Iterator[Session | None]:
        """One read transaction of the store for a search; None where there is no store (a cache file)."""
        if self.store is None:
            yield None
            return
        with self.store.read() as session:
            yield session

    def _index_at(self, revision: int) -> VectorIndex:
        """The index for the store at ``revision``: the one in memory, the saved one, or one rebuilt."""
        if self._index is not None and self._index_revision == revision:
            return self._index
        index = None
        try:
            index = VectorIndex.load(self.index_dir)
        except IndexCorruptError as exc:
            self.notices.append(f"{exc}; rebuilding it from the store")
        if index is None or index.meta.get("revision") != revision or index.meta.get("embedder") != self.ref.key:
            index = self.rebuild(revision)
        self._index, self._index_revision = index, revision
        return index

    def rebuild(self, revision: int | None = None) -> VectorIndex:
        """Rebuild the index from the embeddings table and persist it atomically."""
        ids, vecs = [], []
        with self.store.read() as session:
            if revision is None:
                revision = self.store.revision(session)
            rows = session.execute(
                select(Pair.id, Pair.hash, Embedding.data, Embedding.checksum)
                .join(Embedding, Embedding.pair_hash == Pair.hash)
                .where(Embedding.embedder == self.ref.key)
                .order_by(Pair.id)
            )
            for pid, h, data, checksum in rows:
                fields = {k: v.numpy() for k, v in unpack(data, checksum, f"embedding of pair {h[:12]}").items()}
                for slot, vec in field_vectors(fields):
                    ids.append(pid * SLOTS + slot)
                    vecs.append(vec)
        dim = len(vecs[0]) if vecs else 1  # an empty index answers nothing; its width does not matter
        matrix = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, dim), np.float32)
        index = VectorIndex.build(np.asarray(ids, dtype=np.int64), matrix, index_spec(self.config),
                                  meta={"embedder": self.ref.key, "revision": revision, "pairs": len({i // SLOTS for i in ids})})
        try:
            index.save(self.index_dir)
        except OSError as exc:
            self.notices.append(f"could not save the index to {self.index_dir} ({exc.strerror}); using it in memory")
        self.rebuilt = True
        return index

    # -- search ---------------------------------------------------------------------------------------------------
    def search(self, queries: list[str], k: int | None = None, domain: str | None = None,
               min_score: float | None = None) -> list[QueryResult]:
        """The ``k`` best pairs per query by fused score, and whether the store answers each query (``confident``:
        see ``confidence_rule``; ``min_score`` moves its operating point)."""
        k = k or self.config.index.top_k
        if k < 1 or k > 1000:
            raise ValidationError(f"--top-k must be between 1 and 1000, got {k}")
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise ValidationError("the query is empty")
        depth = max(k, self.config.index.rerank_candidates) if self.rerank else k
        # One read transaction for the revision check, the full-text search and the matched rows: each transaction
        # costs about a millisecond of the few a query takes, and they see one state of the store.
        with self._snapshot() as session:
            index = self.index() if session is None else self._index_at(self.store.revision(session))
            if len(index) == 0:
                raise NotBuiltError("no pair has an embedding yet; run `kvdb build` first")
            allowed = None
            if domain is not None:
                ids = index.ids()
                allowed = ids[np.isin(ids // SLOTS, self._domain_pair_ids(session, domain))]
            vectors = self.embedder().embed(queries)
            found = self.candidates(index, queries, vectors, max(depth, self.config.index.fusion_candidates),
                                    allowed, domain, session)
            fused = [self.fuse(cos, lex, depth) for cos, lex in found]
            rows = self._pairs({pid for r in fused for pid, _ in r}, session)
        calibrated, threshold = self.confidence_rule(min_score)
        results = []
        for query, top, (cos, lex) in zip(queries, fused, found):
            matches = [replace(rows[pid], score=float(score)) for pid, score in top if pid in rows]
            if self.rerank and len(matches) > 0:
                matches = self._rerank(query, matches)
            matches = matches[:k]
            if calibrated is not None:
                p = float(calibrated.probability(features(cos, lex, self.config.index.lexical_weight)))
                results.append(QueryResult(query, bool(matches) and p >= threshold, matches, p))
            else:
                results.append(QueryResult(query, bool(matches) and matches[0].score >= threshold, matches))
        return results

    def confidence_rule(self, min_score: float | None) -> tuple[Calibrator | None, float]:
        """(calibrator, threshold): ``confident`` is calibrated probability >= threshold when a calibrator is
        returned, best score >= threshold otherwise.

        Without the re-rank and with ``index.confident_threshold_no_rerank`` unset (the default) the probability of
        kvdb.confidence decides, at ``min_score`` or ``index.min_confidence`` or the shipped operating point. A
        configured score threshold, and the re-rank path (whose scores the calibrator has not seen), keep the rule
        "the best score reaches the threshold", ``min_score`` replacing the configured one."""
        cfg = self.config.index
        if self.rerank:
            return None, cfg.confident_threshold if min_score is None else min_score
        if cfg.confident_threshold_no_rerank is not None:
            return None, cfg.confident_threshold_no_rerank if min_score is None else min_score
        calibrator = shipped(self.ref.name)
        if calibrator.embedder != self.ref.name and not self._warned_calibration:
            self._warned_calibration = True
            self.notices.append(f"confident is calibrated for the embedder {calibrator.embedder}, not {self.ref.name}; "
                                "set index.confident_threshold_no_rerank or refit with benchmarks/fit_confidence.py")
        if min_score is not None:
            return calibrator, min_score
        return calibrator, calibrator.threshold if cfg.min_confidence is None else cfg.min_confidence

    def dense(self, index: VectorIndex, vectors: np.ndarray, depth: int,
              allowed: np.ndarray | None) -> list[dict[int, float]]:
        """Per query, the ``depth`` best pairs by cosine (a pair scoring its best field)."""
        hits = index.search(vectors, depth * 8 + 16, allowed_ids=allowed)
        return [dict(best_per_pair(h, depth)) for h in hits]

    def lexical(self, queries: list[str], depth: int, domain: str | None,
                session: Session | None = None) -> list[dict[int, float]]:
        """Per query, the ``depth`` best pairs by lexical score in [0, 1); empty where there is no store to search
        (a cache file) or lexical search is off. Reads in ``session`` if given, else in a read transaction of its
        own."""
        if self.store is None or not self.config.index.lexical:
            return [{} for _ in queries]
        from kvdb import lexical

        if session is None:
            with self.store.read() as own:
                return self.lexical(queries, depth, domain, own)
        did = domain_id(session, domain) if domain is not None else None
        return [dict(lexical.search(session, q, depth, did)) for q in queries]

    def candidates(self, index: VectorIndex, queries: list[str], vectors: np.ndarray, depth: int,
                   allowed: np.ndarray | None, domain: str | None,
                   session: Session | None = None) -> list[tuple[dict[int, float], dict[int, float]]]:
        """Per query, (pair id -> best-field cosine, pair id -> lexical score) over the union of the ``depth`` best
        of each list.

        A pair found only lexically gets its exact cosine from the index, so every candidate is scored the same way
        and the fused score stays comparable across queries (which is what the confidence needs)."""
        dense = self.dense(index, vectors, depth, allowed)
        use_lexical = self.config.index.lexical_weight > 0
        lexical = self.lexical(queries, depth, domain, session) if use_lexical else [{} for _ in queries]
        out = []
        for i, (cos, lex) in enumerate(zip(dense, lexical)):
            missing = [pid for pid in lex if pid not in cos]
            if missing:
                cos = {**cos, **self._cosines(index, vectors[i : i + 1], missing)}
            out.append((cos, lex))
        return out

    def fuse(self, cos: dict[int, float], lex: dict[int, float], depth: int) -> list[tuple[int, float]]:
        """The ``depth`` best (pair id, cosine + lexical_weight * lexical score), best first."""
        return fused_ranking(cos, lex, self.config.index.lexical_weight)[:depth]

    def _cosines(self, index: VectorIndex, vector: np.ndarray, pids: list[int]) -> dict[int, float]:
        """The exact best-field cosine of each of ``pids`` that has an embedding (an exact scan of their fields)."""
        if not pids:
            return {}
        fields = (np.asarray(pids, dtype=np.int64)[:, None] * SLOTS + np.arange(SLOTS)).ravel()
        (hits,) = index.search(vector, len(fields), allowed_ids=fields)  # the index keeps the ids it holds
        return dict(best_per_pair(hits, len(pids)))

    def _rerank(self, query: str, matches: list[Match]) -> list[Match]:
        """Candidates re-scored as fused score + weight * PMI(question; answer) under the base model."""
        conditional, null = self.reranker().score(query, [m.answer for m in matches])
        weight = self.config.index.rerank_weight
        for m, c in zip(matches, conditional):
            m.score = m.score + weight * float(c - null)
        return sorted(matches, key=lambda m: -m.score)

    def _pairs(self, pids: set[int], session: Session | None = None) -> dict[int, Match]:
        """The pairs behind index ids (score 0: the caller sets it), read in ``session`` or a transaction of their
        own. Plain rows with the domain joined: no ORM objects to build on the query path."""
        if not pids:
            return {}
        if session is None:
            with self.store.read() as own:
                return self._pairs(pids, own)
        rows = session.execute(select(Pair.id, Pair.hash, Domain.name, Pair.question, Pair.answer, Pair.meta)
                               .join(Domain, Domain.id == Pair.domain_id).where(Pair.id.in_(sorted(pids))))
        return {pid: Match(h, dom, q, a, 0.0, meta or {}, pid) for pid, h, dom, q, a, meta in rows}

    def _domain_pair_ids(self, session: Session, domain: str) -> np.ndarray:
        did = domain_id(session, domain)
        return np.fromiter(session.scalars(select(Pair.id).where(Pair.domain_id == did)), dtype=np.int64)

    def flush_notices(self) -> None:
        for notice in self.notices:
            log.warning(notice)
        self.notices.clear()
