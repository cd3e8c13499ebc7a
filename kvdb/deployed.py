"""Answering from an exported ``knowledge_cache.pth`` alone (`kvdb query --cache`), without the store.

A deployment can ship a cache and a draft checkpoint and nothing else, as the seed's inference script did. The cache
carries what the engine needs: each pair's text, its field embeddings (for the same FAISS search the store's index
serves), its per-token vectors (for the learned draft) and the base model's recorded answers to the pairs'
questions (``base_answers``), read as the store's are: a stored question is answered by replaying its recording,
copies draw on them, and the draft attends to the top pair's. Nothing goes into a store: no index file, no new
recording (only the measured verify-pass costs are kept, under KVDB_HOME/models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvdb.config import Config, Home
from kvdb.errors import ForeignFileError, NotFoundError
from kvdb.export import load_cache, pair_tensors, recorded_entry, variant_entries
from kvdb.index import VectorIndex
from kvdb.recorded import usable_answer
from kvdb.retrieve import SLOTS, Match, Retriever, field_vectors, index_spec


class CacheRetriever(Retriever):
    """Retriever over a loaded cache: the index is built in memory from the cache's field embeddings; pair ids are
    positions in the cache's ``qa_pairs``."""

    def __init__(self, config: Config, home: Home, cache: dict[str, Any], path: str, lm=None,
                 rerank: bool | None = None):
        super().__init__(config, home, store=None, model_fingerprint=cache["model"].get("fingerprint"), lm=lm,
                         rerank=rerank)
        stored = (cache.get("embedder") or {}).get("key")
        if stored != self.ref.key:
            raise ForeignFileError(f"{path} holds embeddings of {stored or 'an unknown embedder'}, but the config's "
                                   f"embedder is {self.ref.key}; export the cache again with this embedder")
        self.cache = cache
        ids, vecs = [], []
        for pid, fields in enumerate(cache["embedding_fields"]):
            for slot, vec in field_vectors({k: v.float().numpy() for k, v in fields.items()}):
                ids.append(pid * SLOTS + slot)
                vecs.append(vec)
        dim = len(vecs[0]) if vecs else 1
        matrix = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, dim), np.float32)
        self._index = VectorIndex.build(np.asarray(ids, dtype=np.int64), matrix, index_spec(config),
                                        meta={"embedder": self.ref.key, "pairs": len(cache["qa_pairs"])})

    def index(self) -> VectorIndex:
        return self._index

    def rebuild(self, revision: int | None = None) -> VectorIndex:
        return self._index

    def _pairs(self, pids: set[int], session=None) -> dict[int, Match]:
        qa = self.cache["qa_pairs"]
        return {pid: Match(qa[pid]["hash"], qa[pid]["domain"], qa[pid]["question"], qa[pid]["answer"], 0.0,
                           qa[pid].get("metadata") or {}, pid) for pid in pids if 0 <= pid < len(qa)}

    def _domain_pair_ids(self, session, domain: str) -> np.ndarray:
        pids = [i for i, qa in enumerate(self.cache["qa_pairs"]) if qa["domain"] == domain]
        if not pids:
            raise NotFoundError(f"the cache has no pairs in domain {domain!r}")
        return np.asarray(pids, dtype=np.int64)


class CacheKnowledge:
    """What `kvdb query --generate --cache FILE` reads: retrieval and pair vectors from the cache file."""

    def __init__(self, config: Config, home: Home, path: str | Path, lm):
        self.path = str(path)
        self.cache = load_cache(path)  # weights_only; format, version and per-pair lists checked
        made_by = self.cache.get("model") or {}
        if made_by.get("fingerprint") != lm.fingerprint:
            raise ForeignFileError(f"{path} was exported for {made_by.get('name', 'another model')}, not "
                                   f"{lm.ref.name}; set model.source to that model or export the cache again")
        self.retriever = CacheRetriever(config, home, self.cache, self.path, lm=lm)
        self._position = {qa["hash"]: i for i, qa in enumerate(self.cache["qa_pairs"])}

    def recording(self, pair_hash: str) -> dict[str, Any] | None:
        i = self._position.get(pair_hash)
        return recorded_entry(self.cache, i) if i is not None else None

    def recorded_answers(self, hashes: list[str]) -> list[list[int]]:
        """As the store's: the recorded answers to the pairs' own questions, then those to their rephrasings."""
        found = (self.recording(h) for h in hashes)
        out = [r["output_ids"].tolist() for r in found if r is not None]
        for h in hashes:
            i = self._position.get(h)
            out += [e["output_ids"].tolist() for e in variant_entries(self.cache, i)] if i is not None else []
        return out

    def pair_knowledge(self, draft, hashes: list[str]):
        from kvdb.draft import PairKnowledge, knowledge_for

        pairs = []
        for h in hashes:
            i = self._position.get(h)
            if i is None:
                continue
            tensors, answer_start = pair_tensors(self.cache, i)
            pairs.append(PairKnowledge.from_vectors(h, tensors, answer_start, draft.key_layer, draft.value_layer))
        top = self.recording(hashes[0]) if hashes else None
        recorded = PairKnowledge.from_answer(hashes[0], top, draft.key_layer, draft.value_layer) if top else None
        return knowledge_for(draft, pairs, recorded)

    def answer_book(self, max_new_tokens: int) -> "CacheAnswers":
        return CacheAnswers(self, max_new_tokens)

    def replay_book(self, engine) -> None:
        """A deployment replays nothing: engine answers live in a store, not in the cache file."""
        return None


class CacheAnswers:
    """The cache's recorded answers as an answer book: looked up by pair and exact prompt; a deployment records
    nothing."""

    def __init__(self, knowledge: CacheKnowledge, max_new_tokens: int):
        self.knowledge, self.max_new_tokens = knowledge, max_new_tokens

    def lookup(self, requests) -> None:
        for r in requests:
            entry = self.knowledge.recording(r.pair_hash) if r.pair_hash else None
            if entry is not None and entry["prompt_ids"].tolist() == list(r.prompt):
                r.output = usable_answer(entry["output_ids"].tolist(), entry["finished"], entry["max_new_tokens"],
                                         self.max_new_tokens)

    def record(self, requests) -> None:
        pass  # nothing is written next to a deployment
