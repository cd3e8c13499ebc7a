"""What `kvdb train` learns from, computed once and reused (``prepare``):

1. pairs and their stored vectors, from the store (``PairVectors`` of the current model) or an exported cache;
2. questions: each pair's question, plus its ``metadata["variants"]`` rephrasings (``training.use_variants``),
   asked with the references retrieved for the pair's question (so one pair's prompts share their long prefix);
3. targets: the base model's greedy answer under exactly the prompt `kvdb query --generate` builds (kvdb.prompt),
   from kvdb.teacher, recorded in the store (kvdb.recorded) so a rerun computes nothing;
4. the recorded answer to each example's top reference's question, as the draft will attend to it.

The held-out split is by pair, so held-out answers were never trained on.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvdb.config import Config, DraftConfig
from kvdb.draft import PairKnowledge, load_recorded_knowledge
from kvdb.errors import CorruptError, ForeignFileError, NotBuiltError, ValidationError
from kvdb.export import load_cache, pair_tensors
from kvdb.prompt import Reference, prompt_ids
from kvdb.recorded import AnswerBook, AnswerRequest
from kvdb.teacher import answer_states, compute_answers, fill_answer_states


# -- source data ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HashedReference(Reference):
    """A reference with the hash of the pair it came from (so the draft can read that pair's vectors)."""

    hash: str = ""


@dataclass
class SourcePair:
    hash: str
    domain: str
    question: str
    answer: str
    variants: list[str]
    in_store: bool = True


@dataclass
class Sources:
    """What training reads: pairs, their knowledge slots (by hash), where they came from."""

    pairs: list[SourcePair]
    knowledge: dict[str, PairKnowledge]
    origin: str  # "store" or the cache path
    skipped: int = 0  # pairs without vectors for this model


def _variants(meta: Any) -> list[str]:
    v = (meta or {}).get("variants") if isinstance(meta, dict) else None
    return [x for x in v if isinstance(x, str) and x.strip()] if isinstance(v, list) else []


def load_store_sources(runtime, fingerprint: str, key_layer: int, value_layer: int) -> Sources:
    """The store's pairs that have vectors for ``fingerprint``; refuses an empty or unbuilt store."""
    from sqlalchemy import select

    from kvdb.store.blobs import unpack
    from kvdb.store.models import Pair, PairVectors

    with runtime.store.read() as session:
        rows = session.scalars(select(Pair).order_by(Pair.id)).all()
        if not rows:
            raise NotBuiltError("the store has no pairs: add some (`kvdb add`, or `kvdb init --examples`), run "
                                "`kvdb build`, then train")
        vec_rows = {r.pair_hash: r for r in session.scalars(
            select(PairVectors).where(PairVectors.fingerprint == fingerprint))}
        if not vec_rows:
            raise NotBuiltError("no pair has vectors for the current model; run `kvdb build` first (the store was "
                                "built for another model, or not built at all)")
        pairs, knowledge = [], {}
        for r in rows:
            v = vec_rows.get(r.hash)
            if v is None:
                continue
            tensors = unpack(v.data, v.checksum, f"vectors of pair {r.hash[:12]}")
            knowledge[r.hash] = PairKnowledge.from_vectors(r.hash, tensors, v.answer_start, key_layer, value_layer)
            pairs.append(SourcePair(r.hash, r.domain.name, r.question, r.answer, _variants(r.meta)))
    return Sources(pairs, knowledge, "store", skipped=len(rows) - len(pairs))


def read_cache(path: str | os.PathLike, fingerprint: str, key_layer: int, value_layer: int,
               store_hashes: set[str] | None = None) -> Sources:
    """The pairs and vectors of an exported ``knowledge_cache*.pth`` (kvdb.export reads its layout)."""
    path = Path(path)
    data = load_cache(path)  # checks format, version and one entry per pair; weights_only
    model = data.get("model") or {}
    if not isinstance(model, dict) or model.get("fingerprint") != fingerprint:
        name = model.get("name", "another model") if isinstance(model, dict) else "another model"
        raise ForeignFileError(f"{path} was exported for {name}, not the current model; export it again with the "
                               "current model (`kvdb build` then `kvdb export`)")
    pairs, knowledge = [], {}
    for i, item in enumerate(data["qa_pairs"]):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("hash", "question", "answer")):
            raise CorruptError(f"{path}: pair {i} lacks hash, question or answer; export it again")
        tensors, answer_start = pair_tensors(data, i)
        h = item["hash"]
        knowledge[h] = PairKnowledge.from_vectors(h, tensors, answer_start, key_layer, value_layer)
        pairs.append(SourcePair(h, str(item.get("domain", "")), item["question"], item["answer"],
                                _variants(item.get("metadata")), in_store=h in (store_hashes or set())))
    if not pairs:
        raise NotBuiltError(f"{path} holds no pairs; export a cache of a built store")
    return Sources(pairs, knowledge, str(path))


# -- references (retrieval) -----------------------------------------------------------------------------------------
ReferencesFor = Callable[[str], Sequence[HashedReference]]


class EmbeddingReferences:
    """A stand-in retriever: cosine of the question's embedding to each pair's question and variants (best field)."""

    def __init__(self, pairs: Sequence[SourcePair], embedder, k: int):
        import numpy as np

        self.pairs = list(pairs)
        self.k = k
        self.embedder = embedder
        texts, owner = [], []
        for i, p in enumerate(self.pairs):
            for t in [p.question, *p.variants]:
                texts.append(t)
                owner.append(i)
        self.matrix = embedder.embed(texts) if texts else np.zeros((0, 1), np.float32)
        self.owner = np.array(owner, dtype=np.int64)
        self._memo: dict[str, list[HashedReference]] = {}

    def prime(self, questions: Sequence[str]) -> None:
        """Embed many questions in one batch."""
        import numpy as np

        todo = [q for q in dict.fromkeys(questions) if q not in self._memo]
        if not todo:
            return
        scores = self.embedder.embed(todo) @ self.matrix.T  # [Q, F]
        for q, row in zip(todo, scores):
            best = np.full(len(self.pairs), -np.inf)
            np.maximum.at(best, self.owner, row)
            top = np.argsort(-best)[: self.k]
            self._memo[q] = [HashedReference(self.pairs[j].question, self.pairs[j].answer, self.pairs[j].hash)
                             for j in top]

    def __call__(self, question: str) -> list[HashedReference]:
        self.prime([question])
        return self._memo[question]


class RetrieverReferences:
    """The real retriever (kvdb.retrieve), as generation uses it (re-ranking optional: see TrainingConfig)."""

    def __init__(self, retriever, k: int):
        self.retriever = retriever
        self.k = k
        self._memo: dict[str, list[HashedReference]] = {}

    def prime(self, questions: Sequence[str]) -> None:
        todo = [q for q in dict.fromkeys(questions) if q not in self._memo]
        for i in range(0, len(todo), 64):
            chunk = todo[i : i + 64]
            for q, res in zip(chunk, self.retriever.search(chunk, self.k)):
                matches = getattr(res, "matches", res)
                self._memo[q] = [HashedReference(m.question, m.answer, m.hash) for m in matches][: self.k]

    def __call__(self, question: str) -> list[HashedReference]:
        self.prime([question])
        return self._memo[question]


def default_references(runtime, lm, sources: Sources, k: int, rerank: bool | None = None) -> ReferencesFor:
    """What generation will use: kvdb.retrieve over the store when it is there (``rerank`` None: as configured),
    else the embedding stand-in (always the stand-in for a cache file, whose pairs need not be in the store)."""
    from kvdb.embed import load_embedder
    from kvdb.identity import resolve_embedder

    if sources.origin == "store":
        from kvdb.retrieve import Retriever

        kwargs = {} if rerank is None else {"rerank": rerank}
        return RetrieverReferences(Retriever(runtime.config, runtime.home, runtime.store,
                                             model_fingerprint=lm.fingerprint, lm=lm, **kwargs), k)
    ref = resolve_embedder(runtime.config.embedder, runtime.home, lm.fingerprint)
    embedder = load_embedder(ref, runtime.config.embedder, lm=lm if ref.source == "base-mean" else None,
                             device=runtime.config.model.device)
    return EmbeddingReferences(sources.pairs, embedder, k)


# -- examples -------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    pair: str  # hash of the pair the question is about
    question: str
    kind: str  # question | variant | paraphrase
    refs: list[str]  # hashes of the reference pairs, in prompt order
    prompt: list[int]
    answer: list[int]  # the base model's greedy answer: what the draft learns to predict
    states: torch.Tensor | None = None  # [L, H] input of the trained layers, L = len(prompt) + len(answer) - 1
    recorded: PairKnowledge | None = None  # the recorded answer to the top reference's question, as knowledge

    @property
    def ids(self) -> list[int]:
        """What the draft reads: prompt + answer[:-1]."""
        return self.prompt + self.answer[:-1]

    @property
    def first(self) -> int:
        """Position whose output predicts answer[0]."""
        return len(self.prompt) - 1


@dataclass
class Prepared:
    train: list[Example]
    heldout: list[Example]
    knowledge: dict[str, PairKnowledge]
    sources: Sources
    info: dict[str, Any] = field(default_factory=dict)


def split_pairs(hashes: Sequence[str], fraction: float, seed: int) -> set[str]:
    """Held-out pair hashes: a seeded ``fraction`` of the pairs (at least one when there are two or more)."""
    hashes = sorted(hashes)
    if fraction <= 0 or len(hashes) < 2:
        return set()
    n = min(len(hashes) - 1, max(1, round(len(hashes) * fraction)))
    return set(random.Random(seed).sample(hashes, n))


def build_examples(sources: Sources, references_for: ReferencesFor,
                   use_variants: bool) -> list[tuple[SourcePair, str, str, list[HashedReference]]]:
    """(pair, question, kind, references) for every training question.

    A pair's variants are asked with the references retrieved for its own question: the prompts of one pair then
    share everything but the user turn, so the base model reads that long prefix once for all of them (it is most of
    each prompt), and the own pair is first, as retrieval puts it for every question of the default set."""
    if hasattr(references_for, "prime"):
        references_for.prime([p.question for p in sources.pairs])
    out = []
    for p in sources.pairs:
        refs = list(references_for(p.question))
        out.append((p, p.question, "question", refs))
        if use_variants:
            out += [(p, v, "variant", refs) for v in p.variants]
    return out


def attach_recorded(examples: Sequence[Example], recorded: dict[str, PairKnowledge],
                    question_of: dict[str, str]) -> int:
    """Give each example the recorded answer to its top reference's question, as drafting will have it; except
    where that recording answers this very question (the pair's own question under its retrieved references):
    there it is the target itself, and a verbatim question is answered by replaying the recording anyway."""
    n = 0
    for e in examples:
        top = e.refs[0] if e.refs else None
        if top in recorded and question_of.get(top) != e.question:
            e.recorded = recorded[top]
            n += 1
    return n


def _load_sources(runtime, lm, key_layer: int, cache: str | os.PathLike | None) -> Sources:
    if cache is None:
        return load_store_sources(runtime, lm.fingerprint, key_layer, lm.num_layers)
    from sqlalchemy import select

    from kvdb.store.models import Pair

    with runtime.store.read() as session:
        in_store = set(session.scalars(select(Pair.hash)))
    return read_cache(cache, lm.fingerprint, key_layer, lm.num_layers, in_store)


def _answered_examples(runtime, lm, sources: Sources, refs_for: ReferencesFor,
                       progress: bool) -> tuple[list[Example], dict[str, int]]:
    """Every training question with the base model's answer (recorded or computed now)."""
    cfg: Config = runtime.config
    items = build_examples(sources, refs_for, cfg.training.use_variants)
    requests = [AnswerRequest(prompt_ids(lm, q, refs), pair_hash=p.hash if kind == "question" and p.in_store else None,
                              group=tuple(r.hash for r in refs), about=p.hash) for p, q, kind, refs in items]
    book = AnswerBook(runtime, lm, cfg.generation.max_new_tokens, replace_stored=False)
    counts = compute_answers(book, requests, cfg.training.answer_batch_size, progress)
    examples = [Example(p.hash, q, kind, [x.hash for x in refs if x.hash in sources.knowledge], r.prompt, r.output)
                for r, (p, q, kind, refs) in zip(requests, items) if r.output]
    return examples, counts


def _recorded_knowledge(runtime, lm, sources: Sources, examples: list[Example], key_layer: int,
                        progress: bool) -> dict[str, int]:
    """Attach to each example the recorded answer to its top reference's question (with the base model's states
    over it, filled in where missing)."""
    layers = sorted({key_layer, lm.num_layers})
    filled = fill_answer_states(runtime, lm, layers, progress=progress)
    recorded = load_recorded_knowledge(runtime.store, lm.fingerprint, [p.hash for p in sources.pairs], key_layer,
                                       lm.num_layers)
    # Pairs only in a cache file have no own-question recording in the store: their own question's example is that
    # recording; its states are computed here (a few per second) and not kept.
    question_of = {p.hash: p.question for p in sources.pairs}
    own = list({e.pair: e for e in examples if e.kind == "question" and e.pair not in recorded
                and e.question == question_of[e.pair]}.values())
    for i in range(0, len(own), 4):
        chunk = own[i : i + 4]
        for e, st in zip(chunk, answer_states(lm, [(e.prompt, e.answer) for e in chunk], layers)):
            got = PairKnowledge.from_answer(e.pair, {**st, "output_ids": torch.tensor(e.answer)}, key_layer,
                                            lm.num_layers)
            if got is not None:
                recorded[e.pair] = got
    return {"answer_states_filled": filled,
            "with_recorded_answer": attach_recorded(examples, recorded, question_of)}


def prepare(runtime, lm, draft_cfg: DraftConfig, cache: str | os.PathLike | None = None,
            references_for: ReferencesFor | None = None, progress: bool = False) -> Prepared:
    """Everything training needs, computed or reused: pairs, knowledge, base answers, the held-out split."""
    tcfg = runtime.config.training
    t0 = time.perf_counter()
    sources = _load_sources(runtime, lm, draft_cfg.num_sampled_layers, cache)
    refs_for = references_for or default_references(runtime, lm, sources, runtime.config.index.top_k,
                                                    rerank=None if tcfg.rerank_references else False)
    examples, counts = _answered_examples(runtime, lm, sources, refs_for, progress)
    t_ans = time.perf_counter()
    if draft_cfg.recorded_knowledge:
        counts.update(_recorded_knowledge(runtime, lm, sources, examples, draft_cfg.num_sampled_layers, progress))
    t_states = time.perf_counter()
    heldout_pairs = split_pairs([p.hash for p in sources.pairs], tcfg.holdout_fraction, tcfg.seed)
    train = [e for e in examples if e.pair not in heldout_pairs]
    heldout = [e for e in examples if e.pair in heldout_pairs]
    if not train:
        raise ValidationError("no training example is left after the held-out split; add pairs or lower "
                              "training.holdout_fraction")
    info = {"pairs": len(sources.pairs), "skipped_pairs": sources.skipped, "heldout_pairs": len(heldout_pairs),
            "train_examples": len(train), "heldout_examples": len(heldout),
            "answer_tokens": sum(len(e.answer) for e in examples), **counts,
            "seconds_answers": round(t_ans - t0, 2), "seconds_answer_states": round(t_states - t_ans, 2)}
    return Prepared(train, heldout, sources.knowledge, sources, info)

