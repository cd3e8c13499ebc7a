"""`kvdb train`: distil the base model into the knowledge-aware draft (kvdb.draft), and measure it offline.

Data, in order (``prepare``):
1. pairs and their stored vectors, from the store (``PairVectors`` of the current model) or an exported cache;
2. questions: each pair's question, plus its ``metadata["variants"]`` rephrasings (``training.use_variants``),
   asked with the references retrieved for the pair's question (so one pair's prompts share their long prefix);
   optional extra contexts (``training.contexts_per_question``: the own pair among random others, shuffled);
3. targets: the base model's greedy answer under exactly the prompt `kvdb query --generate` builds (kvdb.prompt),
   generated in batches that run each shared prefix once (``decode_grouped``). Answers to a pair's own question are
   kept in the store (``base_answers``); the rest in a JSON file under ``KVDB_HOME/checkpoints/base_answers/``,
   both keyed by the exact prompt ids, so a rerun computes nothing. Optionally (``training.samples_per_question``)
   also sampled answers of the training prompts, labelled with the base model's greedy token after every sampled
   prefix (``sample_answers``, kept in a file beside them);
4. inputs of the trained layers: the frozen first layers run once over prompt + answer (and, for a draft with base
   features, the base model's final hidden states, captured while it generated the answers).

Training minimises the cross-entropy of the draft's logits (over the draft vocabulary) against the base model's
greedy tokens on the answer positions (distillation). A draft with base features (EAGLE) is unrolled
``training.unroll_steps`` draft steps deep (EAGLE-3's training-time test, ``draft_outputs``): step i reads its own
estimates for the i features it would not have yet when drafting, and attends as drafting would (``chain_mask``).
A token-only draft needs no unrolling: along an accepted prefix its inputs are exactly the teacher-forced ones.

Metrics (``evaluate``), on the held-out pairs' questions (split by pair, so held-out answers were never trained on):
top-1 agreement with the base model along its own greedy continuation (the first drafted token), and Leviathan et
al.'s expected tokens per verify step for draft lengths 1, 2, 4, 8, simulated exactly from the agreement pattern
(with greedy acceptance a block is accepted up to its first disagreement, and before it the draft saw the
teacher-forced prefix). The untrained early exit (first n layers, final norm, full head) is reported beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvdb import distributed
from kvdb.config import Config, DraftConfig
from kvdb.draft import (
    DraftCache,
    DraftModel,
    Knowledge,
    KnowledgeBatch,
    PairKnowledge,
    check_compatible,
    draft_config_from,
    knowledge_for,
    load_recorded_knowledge,
    read_checkpoint,
    save_checkpoint,
)
from kvdb.errors import (
    CorruptError,
    ForeignFileError,
    NotBuiltError,
    NotFoundError,
    StoreError,
    ValidationError,
)
from kvdb.export import load_cache
from kvdb.answer_file import answer_file, read_answer_file, write_answer_file
from kvdb.fileio import atomic_write_bytes
from kvdb.lm import new_cache
from kvdb.prompt import PROMPT_FORMAT, Reference, prompt_ids

DRAFT_LENGTHS = (1, 2, 4, 8)
LOG_FILE = "train_log.json"
PLOT_FILE = "train_curves.png"
LAST_FILE = "draft_model_last.pth"
GAIN_LR_FACTOR = 30.0


# ---------------------------------------------------------------------------------------------------------------
# source data
# ---------------------------------------------------------------------------------------------------------------


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
    """Read an exported ``knowledge_cache*.pth`` defensively (all layout knowledge of the export lives here)."""
    path = Path(path)
    data = load_cache(path)  # checks format, version and one entry per pair; weights_only
    model = data.get("model") or {}
    if not isinstance(model, dict) or model.get("fingerprint") != fingerprint:
        name = model.get("name", "another model") if isinstance(model, dict) else "another model"
        raise ForeignFileError(f"{path} was exported for {name}, not the current model; export it again with the "
                               "current model (`kvdb build` then `kvdb export`)")
    try:
        qa = list(data["qa_pairs"])
        ids = list(data["token_ids"])
        starts = [int(s) for s in data["answer_starts"]]
        vectors = data["token_vectors"]
    except (KeyError, TypeError, ValueError):
        raise CorruptError(f"{path} lacks qa_pairs, token_ids, token_vectors or answer_starts; export it again") \
            from None
    n = len(qa)
    if isinstance(vectors, dict):  # {layer: [tensor per pair]} -> [{layer_L: tensor}]
        per_pair = [{} for _ in range(n)]
        for layer, items in vectors.items():
            name = str(layer) if str(layer).startswith("layer_") else f"layer_{layer}"
            for i, t in enumerate(list(items)[:n]):
                per_pair[i][name] = t
        vectors = per_pair
    vectors = list(vectors)
    if not (len(ids) == len(starts) == len(vectors) == n):
        raise CorruptError(f"{path} has {n} pairs but {len(ids)} token lists, {len(vectors)} vector sets and "
                           f"{len(starts)} answer starts; export it again")
    pairs, knowledge = [], {}
    for i, item in enumerate(qa):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("hash", "question", "answer")):
            raise CorruptError(f"{path}: pair {i} lacks hash, question or answer; export it again")
        tensors = {str(k): v for k, v in dict(vectors[i]).items() if isinstance(v, torch.Tensor)}
        tensors["token_ids"] = torch.as_tensor(ids[i])
        h = item["hash"]
        knowledge[h] = PairKnowledge.from_vectors(h, tensors, starts[i], key_layer, value_layer)
        pairs.append(SourcePair(h, str(item.get("domain", "")), item["question"], item["answer"],
                                _variants(item.get("metadata")), in_store=h in (store_hashes or set())))
    if not pairs:
        raise NotBuiltError(f"{path} holds no pairs; export a cache of a built store")
    return Sources(pairs, knowledge, str(path))


# ---------------------------------------------------------------------------------------------------------------
# references (retrieval)
# ---------------------------------------------------------------------------------------------------------------

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
            results = self.retriever.search(chunk, self.k)
            for q, res in zip(chunk, results):
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
        try:
            from kvdb.retrieve import Retriever

            kwargs = {} if rerank is None else {"rerank": rerank}
            refs = RetrieverReferences(Retriever(runtime.config, runtime.home, runtime.store,
                                                 model_fingerprint=lm.fingerprint, lm=lm, **kwargs), k)
            refs.prime([sources.pairs[0].question])  # fail here, not mid-way, if its API is not what we expect
            return refs
        except (ImportError, AttributeError, TypeError):
            pass
    ref = resolve_embedder(runtime.config.embedder, runtime.home, lm.fingerprint)
    embedder = load_embedder(ref, runtime.config.embedder, lm=lm if ref.source == "base-mean" else None,
                             device=runtime.config.model.device)
    return EmbeddingReferences(sources.pairs, embedder, k)


# ---------------------------------------------------------------------------------------------------------------
# base-model answers (distillation targets), computed once
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AnswerRequest:
    prompt: list[int]
    pair_hash: str | None = None  # set for a pair's own question with retrieval's references: kept in the store
    output: list[int] | None = None
    group: Any = None  # requests of one group share their prompt's prefix (same references): run it once
    features: torch.Tensor | None = None  # base final hidden states (normed) over prompt + output[:-1], if captured
    about: str | None = None  # the pair this prompt asks about (its question or a rephrasing), for the answer file


def _prompt_key(prompt: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(prompt)).encode()).hexdigest()


def usable_answer(output: list[int], finished: bool, recorded_limit: int, limit: int) -> list[int] | None:
    """A recorded answer serves a request for ``limit`` new tokens if it finished or was allowed as many."""
    if finished or recorded_limit >= limit:
        return output[:limit]
    return None


class AnswerBook:
    """The base model's greedy answers, keyed by the exact prompt ids (a prompt holds the question and references).

    A pair's own question goes to the store's ``base_answers`` (pair hash, model fingerprint, prompt format), where
    the generation engine can reuse it; every other prompt (variants, extra contexts, pairs only in a cache file) to
    a JSON file under the home. An answer recorded with a larger ``max_new_tokens``, or that finished, serves any
    smaller limit.
    """

    def __init__(self, runtime, lm, max_new_tokens: int, replace_stored: bool = True):
        self.runtime = runtime
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        # False: a stored row for another prompt of the pair (e.g. recorded with re-ranked references) is kept, and
        # this prompt's answer goes to the file instead, so two callers never overwrite each other's rows in turn.
        self.replace_stored = replace_stored
        self.path = answer_file(runtime.home, lm.fingerprint)
        self._file: dict[str, dict] | None = None
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file as last read or written

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _load_file(self) -> dict[str, dict]:
        """The answer file, read again when another book or process has written it since (so a long-lived
        answerer sees what later answers recorded, and a write starts from the latest entries)."""
        if self._file is None or self._stamp() != self._seen:
            self._seen = self._stamp()
            self._file = read_answer_file(self.path)
        return self._file

    def _usable(self, output: list[int], finished: bool, limit: int) -> list[int] | None:
        return usable_answer(output, finished, limit, self.max_new_tokens)

    def lookup(self, requests: Sequence[AnswerRequest]) -> None:
        from sqlalchemy import select

        from kvdb.store.blobs import unpack
        from kvdb.store.models import BaseAnswer

        stored = [r for r in requests if r.pair_hash]
        if stored:
            with self.runtime.store.read() as session:
                rows = {row.pair_hash: row for row in session.scalars(select(BaseAnswer).where(
                    BaseAnswer.fingerprint == self.lm.fingerprint, BaseAnswer.prompt_format == PROMPT_FORMAT,
                    BaseAnswer.pair_hash.in_([r.pair_hash for r in stored])))}
            for r in stored:
                row = rows.get(r.pair_hash)
                if row is None:
                    continue
                try:
                    t = unpack(row.data, row.checksum, f"base answer of pair {r.pair_hash[:12]}")
                except CorruptError:
                    continue  # recomputed and replaced below
                if t["prompt_ids"].tolist() == r.prompt:
                    r.output = self._usable(t["output_ids"].tolist(), row.finished, row.max_new_tokens)
                elif not self.replace_stored:
                    r.pair_hash = None
        book = self._load_file()
        for r in requests:
            if r.output is None and not r.pair_hash:
                entry = book.get(_prompt_key(r.prompt))
                if isinstance(entry, dict) and isinstance(entry.get("output"), list):
                    r.output = self._usable(entry["output"], bool(entry.get("finished")),
                                            int(entry.get("max_new_tokens", 0)))

    def record(self, requests: Sequence[AnswerRequest]) -> None:
        """Store the answers of ``requests`` (their ``output`` set): one transaction, then the file atomically."""
        from sqlalchemy import delete

        from kvdb.store.blobs import pack
        from kvdb.store.basemodels import ensure_model
        from kvdb.store.models import BaseAnswer, Pair

        eos = set(self.lm.eos_ids)
        stored = [r for r in requests if r.pair_hash and r.output is not None]
        if stored:
            with self.runtime.store.write() as session:
                from sqlalchemy import select

                alive = set(session.scalars(select(Pair.hash).where(Pair.hash.in_([r.pair_hash for r in stored]))))
                ensure_model(session, self.lm.fingerprint, name=self.lm.ref.name, source=self.lm.ref.source,
                             hidden_size=self.lm.hidden_size, num_layers=self.lm.num_layers, info=self.lm.describe())
                for r in stored:
                    if r.pair_hash not in alive:
                        continue
                    session.execute(delete(BaseAnswer).where(
                        BaseAnswer.pair_hash == r.pair_hash, BaseAnswer.fingerprint == self.lm.fingerprint,
                        BaseAnswer.prompt_format == PROMPT_FORMAT))
                    data, digest = pack({"prompt_ids": torch.tensor(r.prompt, dtype=torch.int32),
                                         "output_ids": torch.tensor(r.output, dtype=torch.int32)})
                    session.add(BaseAnswer(pair_hash=r.pair_hash, fingerprint=self.lm.fingerprint,
                                           prompt_format=PROMPT_FORMAT, max_new_tokens=self.max_new_tokens,
                                           finished=bool(r.output) and r.output[-1] in eos,
                                           text=self.lm.decode(r.output), data=data, checksum=digest))
        rest = [r for r in requests if not r.pair_hash and r.output is not None]
        if rest:
            book = self._load_file()
            for r in rest:
                book[_prompt_key(r.prompt)] = {"output": r.output, "max_new_tokens": self.max_new_tokens,
                                               "finished": bool(r.output) and r.output[-1] in eos}
                if r.about:
                    book[_prompt_key(r.prompt)]["pair"] = r.about
            self._write_file()

    def _write_file(self) -> None:
        write_answer_file(self.path, self._file or {})
        self._seen = self._stamp()

    def tag(self, requests: Sequence[AnswerRequest]) -> None:
        """Note in the answer file which pair each answered prompt is about (answers recorded before the file
        carried it), so ``answers_about`` finds them."""
        book, changed = self._load_file(), False
        for r in requests:
            entry = book.get(_prompt_key(r.prompt)) if r.about and not r.pair_hash else None
            if isinstance(entry, dict) and entry.get("pair") != r.about:
                entry["pair"] = r.about
                changed = True
        if changed:
            self._write_file()

    def answers_about(self, hashes: Sequence[str]) -> list[list[int]]:
        """The base model's answers in the file to rephrasings of the pairs ``hashes`` (training's variants, and
        queries retrieval was sure of): its own wording about those pairs, which a new rephrasing often repeats."""
        wanted = set(hashes)
        return [e["output"] for e in self._load_file().values()
                if isinstance(e, dict) and e.get("pair") in wanted and isinstance(e.get("output"), list)]


def answer_states(lm, answers: Sequence[tuple[list[int], list[int]]], layers: Sequence[int]) -> list[dict]:
    """For each (prompt, answer): the base model's ``layers`` states at the positions that predicted each answer
    token, {"layer_<L>": [len(answer), H] fp16}; one padded forward pass over prompt + answer[:-1]."""
    from kvdb.build import layer_states

    states = layer_states(lm, [list(p) + list(a)[:-1] for p, a in answers], list(layers))
    return [{k: v[len(p) - 1 :] for k, v in st.items()} for (p, _), st in zip(answers, states)]


def fill_answer_states(runtime, lm, layers: Sequence[int], batch_size: int = 4, progress: bool = False) -> int:
    """Add the base model's ``layers`` states over each stored answer (one row per answer token: the state at the
    position that predicted it) to the recordings that lack them; returns how many were filled.

    The draft attends to them as knowledge (``draft.recorded_knowledge``). They are computed by one forward pass
    over prompt + answer rather than captured while generating, so recordings made by `kvdb query` get them too,
    the next time training runs. A row replaced meanwhile (another writer) is left alone."""
    from sqlalchemy import select
    from tqdm import tqdm

    from kvdb.store.blobs import pack, unpack
    from kvdb.store.models import BaseAnswer

    names = [f"layer_{n}" for n in layers]
    todo: list[tuple[str, str, dict[str, torch.Tensor]]] = []
    with runtime.store.read() as session:
        for row in session.scalars(select(BaseAnswer).where(BaseAnswer.fingerprint == lm.fingerprint,
                                                            BaseAnswer.prompt_format == PROMPT_FORMAT)):
            try:
                t = unpack(row.data, row.checksum, f"base answer of pair {row.pair_hash[:12]}")
            except CorruptError:
                continue  # recomputed when its answer is next needed
            if t["output_ids"].numel() and any(n not in t for n in names):
                todo.append((row.pair_hash, row.checksum, t))
    todo.sort(key=lambda x: x[2]["prompt_ids"].numel() + x[2]["output_ids"].numel())
    bar = tqdm(total=len(todo), unit="answer", desc="answer states", disable=not progress or not todo, leave=False,
               dynamic_ncols=True)
    filled = 0
    try:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            states = answer_states(lm, [(t["prompt_ids"].tolist(), t["output_ids"].tolist()) for _, _, t in chunk],
                                   layers)
            with runtime.store.write() as session:
                for (pair_hash, checksum, t), extra in zip(chunk, states):
                    row = session.scalars(select(BaseAnswer).where(
                        BaseAnswer.pair_hash == pair_hash, BaseAnswer.fingerprint == lm.fingerprint,
                        BaseAnswer.prompt_format == PROMPT_FORMAT)).first()
                    if row is None or row.checksum != checksum:
                        continue
                    row.data, row.checksum = pack({**t, **extra})
                    filled += 1
            bar.update(len(chunk))
    finally:
        bar.close()
    return filled


def _common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    n = min(len(p) for p in prompts)
    first = prompts[0]
    for i in range(n):
        if any(p[i] != first[i] for p in prompts[1:]):
            return i
    return n


@dataclass
class GroupedDecode:
    answers: list[list[list[int]]]  # per group, per prompt: the generated ids
    features: list[list[torch.Tensor]] | None = None  # per group, per prompt: [prompt + answer - 1, H] (capture)
    labels: list[list[list[int]]] | None = None  # per group, per prompt: the argmax at every generated step


@torch.inference_mode()
def decode_grouped(lm, groups: Sequence[Sequence[Sequence[int]]], max_new_tokens: int, capture: bool = False,
                   temperature: float = 0.0, generator: torch.Generator | None = None) -> GroupedDecode:
    """Answers of several groups of prompts, greedy (``temperature`` 0) or sampled; the prompts of a group share a
    prefix (the system turn with its references), which is run once per group.

    Layout of row r (a prompt of group g): ``[pad..][prefix_g][pad..][tail_r][answer..]`` with an attention mask
    that hides the pads and positions that count real tokens only, so each row computes what it would alone.
    Rows that finish are dropped from the batch as they go. Each answer ends at its first end-of-turn token.
    With ``capture`` also returns, per prompt, the base model's final hidden states (after its final norm) at
    every position it ran: prompt + answer[:-1] (the draft's feature targets, for free). Sampling also returns the
    base model's argmax at every step (``labels``): its greedy choice after each sampled prefix, the draft's target
    there.
    """
    model, dev = lm.model, lm.device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eos_ids[0]
    eos = torch.tensor(sorted(set(lm.eos_ids)), device=dev)
    caught: list[torch.Tensor] = []
    handle = None
    if capture:
        handle = lm.layers[-1].register_forward_hook(
            lambda _m, _i, out: caught.append(out[0] if isinstance(out, tuple) else out))
    try:
        cuts = [min(_common_prefix(g), min(len(p) for p in g) - 1) for g in groups]  # every row keeps a tail token
        width = max(cuts)
        ids = torch.full((len(groups), max(width, 1)), pad, dtype=torch.long)
        mask = torch.zeros((len(groups), max(width, 1)), dtype=torch.long)
        for i, (g, c) in enumerate(zip(groups, cuts)):
            if c:
                ids[i, width - c:] = torch.tensor(list(g[0][:c]))
                mask[i, width - c:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        cache = new_cache(model)
        prefix_states = None
        if width:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                  logits_to_keep=1)
            prefix_states = caught.pop() if capture else None
        owner = torch.tensor([i for i, g in enumerate(groups) for _ in g], device=dev)
        if width:
            cache.batch_select_indices(owner)
        mask = mask[owner]
        tails = [p[c:] for g, c in zip(groups, cuts) for p in g]
        span = max(len(t) for t in tails)
        tail_ids = torch.full((len(tails), span), pad, dtype=torch.long)
        tail_mask = torch.zeros((len(tails), span), dtype=torch.long)
        for i, t in enumerate(tails):
            tail_ids[i, span - len(t):] = torch.tensor(list(t))
            tail_mask[i, span - len(t):] = 1
        mask = torch.cat([mask, tail_mask.to(dev)], dim=-1) if width else tail_mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=tail_ids.to(dev), attention_mask=mask, position_ids=pos[:, -span:], cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        tail_states = caught.pop() if capture else None
        rows = torch.arange(len(tails), device=dev)  # which answer each live batch row belongs to
        answers: list[list[int]] = [[] for _ in tails]
        labels: list[list[int]] = [[] for _ in tails]
        steps: list[list[torch.Tensor]] = [[] for _ in tails]
        last_pos = pos[:, -1]
        for step in range(max_new_tokens):
            best = logits.argmax(-1)  # [B]
            nxt = best
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(dev)
                for r, t in zip(rows.tolist(), best.tolist()):
                    labels[r].append(t)
            for r, t in zip(rows.tolist(), nxt.tolist()):
                answers[r].append(t)
            live = ~torch.isin(nxt, eos)
            if step + 1 == max_new_tokens or not bool(live.any()):
                break
            if not bool(live.all()):
                keep = live.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, nxt, mask, last_pos = rows[keep], nxt[keep], mask[keep], last_pos[keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            last_pos = last_pos + 1
            logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                           cache=cache, use_cache=True).logits[:, -1]
            if capture:
                state = caught.pop()
                for j, r in enumerate(rows.tolist()):
                    steps[r].append(state[j, 0])
    finally:
        if handle is not None:
            handle.remove()
    out, feats, labs, i = [], [], [], 0
    norm = lm.decoder.norm
    for gi, (g, c) in enumerate(zip(groups, cuts)):
        out.append(answers[i : i + len(g)])
        labs.append(labels[i : i + len(g)])
        if capture:
            group_feats = []
            for r in range(i, i + len(g)):
                parts = [prefix_states[gi, width - c:]] if c else []
                parts.append(tail_states[r, span - len(tails[r]):])
                if steps[r]:
                    parts.append(torch.stack(steps[r]))
                group_feats.append(norm(torch.cat(parts)).cpu() if dev.type != "cuda" else norm(torch.cat(parts)))
            feats.append(group_feats)
        i += len(g)
    return GroupedDecode(out, feats if capture else None, labs if temperature > 0 else None)


def prefix_batches(requests: Sequence[Any], group_of: Callable[[Any], Any], batch_size: int) -> Iterator[list[list]]:
    """Requests grouped by ``group_of`` (prompts sharing their prefix), shortest prompts first, about
    ``batch_size`` rows a batch (a group is never split)."""
    groups: dict[Any, list] = {}
    for r in requests:
        groups.setdefault(group_of(r), []).append(r)
    batch: list[list] = []
    for group in sorted(groups.values(), key=lambda g: max(len(r.prompt) for r in g)):
        batch.append(group)
        if sum(len(g) for g in batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def compute_answers(book: AnswerBook, requests: Sequence[AnswerRequest], batch_size: int,
                    progress: bool = False, capture: bool = False) -> dict[str, int]:
    """Fill ``output`` of every request: reuse recorded answers, generate the rest (grouped by shared prompt prefix,
    about ``batch_size`` rows a batch)."""
    from tqdm import tqdm

    book.lookup(requests)
    book.tag(requests)
    todo = [r for r in requests if r.output is None]
    reused = len(requests) - len(todo)
    bar = tqdm(total=len(todo), unit="answer", desc="base answers", disable=not progress or not todo, leave=False,
               dynamic_ncols=True)
    try:
        for batch in prefix_batches(todo, lambda r: r.group if r.group is not None else id(r), batch_size):
            got = decode_grouped(book.lm, [[r.prompt for r in g] for g in batch], book.max_new_tokens,
                                 capture=capture)
            for gi, g in enumerate(batch):
                for ri, r in enumerate(g):
                    r.output = got.answers[gi][ri]
                    if got.features is not None:
                        r.features = got.features[gi][ri]
            done = [r for g in batch for r in g]
            book.record(done)  # each batch is kept: an interrupted run resumes here
            bar.update(len(done))
    finally:
        bar.close()
    return {"recorded": len(todo), "reused": reused}


@dataclass
class SampleRequest:
    prompt: list[int]
    index: int  # which sample of this prompt (each its own seed)
    group: Any = None
    output: list[int] | None = None  # the sampled ids
    labels: list[int] | None = None  # the base model's argmax after each sampled prefix
    features: torch.Tensor | None = None


def sample_answers(runtime, lm, requests: Sequence[SampleRequest], temperature: float, batch_size: int,
                   seed: int, progress: bool = False, capture: bool = False) -> dict[str, int]:
    """Fill ``output`` and ``labels`` of every request with a sampled answer of the base model and its greedy choice
    at each step: more distillation targets, along prefixes near the greedy ones, for the price of generating.

    Kept in a JSON file under ``KVDB_HOME/checkpoints/base_answers/`` keyed by prompt, sample index, temperature and
    length (each batch as it finishes), so a rerun samples nothing. A sample is drawn with a generator seeded by the
    batch's first key: reruns of the same plan reproduce the file."""
    from tqdm import tqdm

    path = runtime.home.checkpoints_dir / "base_answers" / f"{lm.fingerprint[:16]}-{PROMPT_FORMAT}-samples.json"
    book = read_answer_file(path)
    limit = runtime.config.generation.max_new_tokens

    def key(r: SampleRequest) -> str:
        return f"{_prompt_key(r.prompt)}:{r.index}:{temperature:g}:{limit}"

    todo = []
    for r in requests:
        entry = book.get(key(r))
        ok = isinstance(entry, dict) and isinstance(entry.get("output"), list) and isinstance(entry.get("labels"), list)
        if ok and len(entry["output"]) == len(entry["labels"]):
            r.output, r.labels = entry["output"], entry["labels"]
        else:
            todo.append(r)
    bar = tqdm(total=len(todo), unit="sample", desc="base samples", disable=not progress or not todo, leave=False,
               dynamic_ncols=True)
    try:
        for batch in prefix_batches(todo, lambda r: (r.group if r.group is not None else id(r), r.index), batch_size):
            first = key(batch[0][0])
            gen = torch.Generator().manual_seed(seed ^ int(hashlib.sha256(first.encode()).hexdigest()[:12], 16))
            got = decode_grouped(lm, [[r.prompt for r in g] for g in batch], limit, capture=capture,
                                 temperature=temperature, generator=gen)
            for gi, g in enumerate(batch):
                for ri, r in enumerate(g):
                    r.output, r.labels = got.answers[gi][ri], got.labels[gi][ri]
                    if got.features is not None:
                        r.features = got.features[gi][ri]
                    book[key(r)] = {"output": r.output, "labels": r.labels}
            write_answer_file(path, book)
            bar.update(sum(len(g) for g in batch))
    finally:
        bar.close()
    return {"sampled": len(todo), "samples_reused": len(requests) - len(todo)}


def record_base_answers(runtime, lm, references_for: ReferencesFor | None = None, hashes: Sequence[str] | None = None,
                        batch_size: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Compute and store the base model's greedy answers to the store's pairs' own questions (missing ones only),
    under the prompt `kvdb query --generate` builds: the question with its retrieved pairs as references."""
    cfg = runtime.config
    n = cfg.draft.num_sampled_layers
    sources = load_store_sources(runtime, lm.fingerprint, n, lm.num_layers)
    pairs = [p for p in sources.pairs if hashes is None or p.hash in set(hashes)]
    refs = references_for or default_references(runtime, lm, sources, cfg.index.top_k)
    if hasattr(refs, "prime"):
        refs.prime([p.question for p in pairs])
    requests = [AnswerRequest(prompt_ids(lm, p.question, list(refs(p.question))), pair_hash=p.hash) for p in pairs]
    t0 = time.perf_counter()
    book = AnswerBook(runtime, lm, cfg.generation.max_new_tokens)
    counts = compute_answers(book, requests, batch_size or cfg.training.answer_batch_size, progress)
    return {**counts, "pairs": len(pairs), "prompt_format": PROMPT_FORMAT, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    pair: str  # hash of the pair the question is about
    question: str
    kind: str  # question | variant | context | sample | paraphrase
    refs: list[str]  # hashes of the reference pairs, in prompt order
    prompt: list[int]
    answer: list[int]  # the base model's greedy answer, or a sampled one (then ``labels`` are the targets)
    states: torch.Tensor | None = None  # [L, H] input of the trained layers, L = len(prompt) + len(answer) - 1
    features: torch.Tensor | None = None  # [L, H] the base model's final hidden state (normed) at each position
    labels: list[int] | None = None  # sampled answers: the base model's greedy token after each answer prefix
    recorded: PairKnowledge | None = None  # the recorded answer to the top reference's question, as knowledge
    soft: tuple[torch.Tensor, torch.Tensor] | None = None  # base model's top-k next ids [A, k] and probs [A, k]

    @property
    def targets(self) -> list[int]:
        """What the draft should predict at each answer position: the base model's greedy next token."""
        return self.labels if self.labels is not None else self.answer

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


def build_examples(lm, sources: Sources, references_for: ReferencesFor, tcfg,
                   seed: int = 0) -> list[tuple[SourcePair, str, str, list[HashedReference]]]:
    """(pair, question, kind, references) for every training question and context.

    A pair's variants are asked with the references retrieved for its own question: the prompts of one pair then
    share everything but the user turn, so the base model reads that long prefix once for all of them (it is most of
    each prompt), and the own pair is first, as retrieval puts it for every question of the default set."""
    rng = random.Random(seed)
    if hasattr(references_for, "prime"):
        references_for.prime([p.question for p in sources.pairs])
    by_hash = {p.hash: p for p in sources.pairs}
    out = []
    for p in sources.pairs:
        refs = list(references_for(p.question))
        out.append((p, p.question, "question", refs))
        if tcfg.use_variants:
            out += [(p, v, "variant", refs) for v in p.variants]
        for _ in range(max(0, tcfg.contexts_per_question - 1)):
            others = [h for h in by_hash if h != p.hash]
            picked = rng.sample(others, min(len(others), max(0, len(refs) - 1)))
            ctx = [p.hash, *picked]
            rng.shuffle(ctx)
            refs_ctx = [HashedReference(by_hash[h].question, by_hash[h].answer, h) for h in ctx]
            out += [(p, q, "context", refs_ctx) for q in [p.question, *(p.variants if tcfg.use_variants else [])]]
    return out


def prepare(runtime, lm, draft_cfg: DraftConfig, cache: str | os.PathLike | None = None,
            references_for: ReferencesFor | None = None, progress: bool = False) -> Prepared:
    """Everything training needs, computed or reused: pairs, knowledge, base answers (with the base model's final
    hidden states when they are computed now), the held-out split."""
    from sqlalchemy import select

    from kvdb.store.models import Pair

    cfg: Config = runtime.config
    tcfg = cfg.training
    if tcfg.samples_per_question < 0 or (tcfg.samples_per_question and not 0 < tcfg.sample_temperature <= 10):
        raise ValidationError("training.samples_per_question must be at least 0 and training.sample_temperature "
                              f"in (0, 10]; got {tcfg.samples_per_question} and {tcfg.sample_temperature}")
    t0 = time.perf_counter()
    key_layer, value_layer = draft_cfg.num_sampled_layers, lm.num_layers
    if cache is not None:
        with runtime.store.read() as session:
            in_store = set(session.scalars(select(Pair.hash)))
        sources = read_cache(cache, lm.fingerprint, key_layer, value_layer, in_store)
    else:
        sources = load_store_sources(runtime, lm.fingerprint, key_layer, value_layer)
    refs_for = references_for or default_references(runtime, lm, sources, cfg.index.top_k,
                                                    rerank=None if tcfg.rerank_references else False)
    items = build_examples(lm, sources, refs_for, tcfg, seed=tcfg.seed)
    heldout_pairs = split_pairs([p.hash for p in sources.pairs], tcfg.holdout_fraction, tcfg.seed)
    requests, meta = [], []
    for p, q, kind, refs in items:
        own = kind == "question" and p.in_store
        requests.append(AnswerRequest(prompt_ids(lm, q, refs), pair_hash=p.hash if own else None,
                                      group=tuple(r.hash for r in refs), about=p.hash))
        meta.append((p.hash, q, kind, refs))
    t_ref = time.perf_counter()
    book = AnswerBook(runtime, lm, cfg.generation.max_new_tokens, replace_stored=False)
    counts = compute_answers(book, requests, tcfg.answer_batch_size, progress,
                             capture=draft_cfg.use_base_features)
    t_ans = time.perf_counter()
    train, heldout = [], []
    for r, (pair, q, kind, refs) in zip(requests, meta):
        if not r.output:
            continue
        ex = Example(pair, q, kind, [x.hash for x in refs if x.hash in sources.knowledge], r.prompt, r.output,
                     features=r.features)
        (heldout if pair in heldout_pairs else train).append(ex)
    # Sampled answers of the training prompts only: the held-out metric stays on greedy continuations of questions
    # whose pairs were never trained on.
    samples = [(SampleRequest(r.prompt, i, group=r.group), m) for r, m in zip(requests, meta)
               if m[0] not in heldout_pairs for i in range(tcfg.samples_per_question)]
    if samples:
        counts.update(sample_answers(runtime, lm, [s for s, _ in samples], tcfg.sample_temperature,
                                     tcfg.answer_batch_size, tcfg.seed, progress, capture=draft_cfg.use_base_features))
        for s, (pair, q, kind, refs) in samples:
            if s.output:
                train.append(Example(pair, q, "sample", [x.hash for x in refs if x.hash in sources.knowledge],
                                     s.prompt, s.output, features=s.features, labels=s.labels))
    t_samples = time.perf_counter()
    if draft_cfg.recorded_knowledge:
        layers = sorted({key_layer, value_layer})
        counts["answer_states_filled"] = fill_answer_states(runtime, lm, layers, progress=progress)
        recorded = load_recorded_knowledge(runtime.store, lm.fingerprint, [p.hash for p in sources.pairs],
                                           key_layer, value_layer)
        # Pairs only in a cache file have their recording in the answer file, not the store: their own question's
        # example is that recording; its states are computed here (a few per second) and not kept.
        question_of = {p.hash: p.question for p in sources.pairs}
        own = {e.pair: e for e in train + heldout if e.kind == "question" and e.answer and e.pair not in recorded
               and e.question == question_of[e.pair]}
        items = list(own.values())
        for i in range(0, len(items), 4):
            chunk = items[i : i + 4]
            for e, st in zip(chunk, answer_states(lm, [(e.prompt, e.answer) for e in chunk], layers)):
                got = PairKnowledge.from_answer(e.pair, {**st, "output_ids": torch.tensor(e.answer)}, key_layer,
                                                value_layer)
                if got is not None:
                    recorded[e.pair] = got
        counts["with_recorded_answer"] = attach_recorded(train + heldout, recorded, question_of)
    t_states = time.perf_counter()
    if not train:
        raise ValidationError("no training example is left after the held-out split; add pairs or lower "
                              "training.holdout_fraction")
    info = {"pairs": len(sources.pairs), "skipped_pairs": sources.skipped, "heldout_pairs": len(heldout_pairs),
            "train_examples": len(train), "heldout_examples": len(heldout),
            "answer_tokens": sum(len(e.answer) for e in train + heldout), **counts,
            "seconds_references": round(t_ref - t0, 2), "seconds_answers": round(t_ans - t_ref, 2),
            "seconds_samples": round(t_samples - t_ans, 2), "seconds_answer_states": round(t_states - t_samples, 2)}
    return Prepared(train, heldout, sources.knowledge, sources, info)


# ---------------------------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------------------------


def knowledge_of(ex: Example, knowledge: dict[str, PairKnowledge], draft: DraftModel) -> Knowledge:
    return knowledge_for(draft, [knowledge[h] for h in ex.refs if h in knowledge], ex.recorded)


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


def _keep_device(draft: DraftModel) -> torch.device:
    return draft.device if draft.device.type == "cuda" else torch.device("cpu")


@torch.no_grad()
def frozen_states(draft: DraftModel, examples: Sequence[Example], batch_size: int = 8) -> None:
    """Run the frozen first layers once over each example (they never change); keep their output in the model's
    dtype on the CPU (or the GPU)."""
    todo = sorted((e for e in examples if e.states is None), key=lambda e: len(e.ids))
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        hidden = draft.lower(_pad_ids([e.ids for e in chunk], draft.device))
        for j, e in enumerate(chunk):
            e.states = hidden[j, : len(e.ids)].to(_keep_device(draft)).clone()


@torch.no_grad()  # not inference mode: features feed the draft's training graph
def _teacher_passes(lm, todo: Sequence[Example], batch_size: int, desc: str,
                    progress: bool) -> Iterator[tuple[list[Example], torch.Tensor]]:
    """The base model's final hidden states (normed) over prompt + answer[:-1] of ``todo``, a padded batch at a
    time: (examples, [B, T, H])."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="seq", desc=desc, disable=not progress or not todo, leave=False,
               dynamic_ncols=True)
    try:
        for i in range(0, len(todo), batch_size):
            chunk = list(todo[i : i + batch_size])
            ids = _pad_ids([e.ids for e in chunk], lm.device)
            mask = torch.zeros_like(ids)
            for j, e in enumerate(chunk):
                mask[j, : len(e.ids)] = 1
            yield chunk, lm.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            bar.update(len(chunk))
    finally:
        bar.close()


def teacher_features(lm, examples: Sequence[Example], batch_size: int = 8, progress: bool = False) -> int:
    """The base model's final hidden states (normed) over prompt + answer[:-1], for examples whose answers were
    recorded earlier (fresh answers bring them from generation). Returns how many were computed."""
    todo = sorted((e for e in examples if e.features is None), key=lambda e: len(e.ids))
    keep = lm.device if lm.device.type == "cuda" else torch.device("cpu")
    for chunk, out in _teacher_passes(lm, todo, batch_size, "base features", progress):
        for j, e in enumerate(chunk):
            e.features = out[j, : len(e.ids)].to(keep).clone()
    return len(todo)


def teacher_soft_targets(lm, examples: Sequence[Example], top_k: int, batch_size: int = 8,
                         progress: bool = False) -> int:
    """The base model's top-``top_k`` next-token probabilities at every answer position (``Example.soft``), for
    distillation on its distribution rather than its argmax alone. Returns how many examples were computed."""
    todo = sorted((e for e in examples if e.soft is None), key=lambda e: len(e.ids))
    head = lm.model.get_output_embeddings()
    for chunk, hidden in _teacher_passes(lm, todo, batch_size, "base distributions", progress):
        for j, e in enumerate(chunk):
            with torch.no_grad():
                logits = head(hidden[j, e.first : e.first + len(e.answer)]).float()  # [A, V]
            probs, top = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)  # [A, k] each
            e.soft = (top.cpu(), probs.to(torch.float16).cpu())
    return len(todo)


def _pad_ids(rows: Sequence[Sequence[int]], device) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    out = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r))
    return out.to(device)


def _autocast(draft: DraftModel):
    import contextlib

    if draft.dtype in (torch.bfloat16, torch.float16):
        # fp32 trained weights, half-precision base model: compute in the base model's dtype.
        return torch.autocast(draft.device.type, dtype=draft.dtype)
    return contextlib.nullcontext()


def chain_mask(length: int, step: int, device, dtype) -> torch.Tensor:
    """Attention mask [1, 1, T, (step+1)T] of unrolled draft step ``step`` over the cache of steps 0..step.

    Query (step i, position t) sees step 0 (exact inputs) at positions <= t - i, and step i' at position
    t - i + i' for i' = 1..i: the tokens the draft itself proposed on the way from t - i to t."""
    t = torch.arange(length, device=device).view(length, 1)
    cols = torch.arange(length, device=device).view(1, length)
    blocks = [cols <= t - step] + [cols == t - step + j for j in range(1, step + 1)]
    allowed = torch.cat(blocks, dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.view(1, 1, length, (step + 1) * length)


@dataclass
class StepOutput:
    logits: torch.Tensor  # [M, V'] at the scored answer positions of this unrolled step
    labels: torch.Tensor  # [M] vocabulary positions (-1: outside the vocabulary)
    answer_index: torch.Tensor  # [M] which answer token each row predicts
    example: torch.Tensor  # [M] which example of the batch
    soft_ids: torch.Tensor | None = None  # [M, k] vocabulary positions of the base model's top k (-1: outside)
    soft_probs: torch.Tensor | None = None  # [M, k] their probabilities


def draft_outputs(draft: DraftModel, batch: Sequence[Example], knowledge: dict[str, PairKnowledge],
                  vocab: torch.Tensor, index: torch.Tensor, use_knowledge: bool = True, steps: int = 1,
                  use_features: bool = True) -> tuple[list[StepOutput], torch.Tensor | None, torch.Tensor | None]:
    """Teacher-forced draft outputs on a batch, unrolled ``steps`` draft steps deep (EAGLE-3's training-time test).

    Step 0 reads exact base features (as the first token drafted after a verification); step i reads, for the
    answer positions, the draft's own step i-1 estimate of the previous position's feature and attends to the
    earlier positions as in ``chain_mask``: exactly what drafting i tokens past the verified ones computes.
    Step i is scored at answer tokens i and later. Returns the steps' outputs, and the draft's step-0 final hidden
    states with the base model's (the EAGLE feature target) at the answer positions."""
    dev = draft.device
    work_dtype = next(draft.layers.parameters()).dtype if len(draft.layers) else draft.dtype
    b = len(batch)
    longest = max(len(e.ids) for e in batch)
    hidden = torch.zeros(b, longest, draft.hidden_size, dtype=work_dtype, device=dev)
    for i, e in enumerate(batch):
        hidden[i, : len(e.ids)] = e.states.to(dev, work_dtype)
    features = use_features and draft.feature_layer is not None
    exact = None
    if features:
        exact = torch.zeros(b, longest, draft.hidden_size, dtype=work_dtype, device=dev)
        for i, e in enumerate(batch):
            if e.features is None:
                raise ValidationError("an example has no base features; compute them with teacher_features()")
            exact[i, 1 : len(e.ids)] = e.features[: len(e.ids) - 1].to(dev, work_dtype)
    else:
        steps = 1
    # Answer positions [B, A]: position first + a predicts answer[a].
    width = max(len(e.answer) for e in batch)
    pos = torch.zeros(b, width, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    labels = torch.full((b, width), -1, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.answer)
        pos[i, :n] = torch.arange(e.first, e.first + n)
        valid[i, :n] = True
        labels[i, :n] = index[torch.tensor(e.targets)]
    pos, valid, labels = pos.to(dev), valid.to(dev), labels.to(dev)
    soft_ids = soft_probs = None
    if all(e.soft is not None for e in batch):
        k = batch[0].soft[0].shape[1]
        soft_ids = torch.full((b, width, k), -1, dtype=torch.long)
        soft_probs = torch.zeros(b, width, k)
        for i, e in enumerate(batch):
            n = len(e.answer)
            soft_ids[i, :n] = index[e.soft[0][:n]]
            soft_probs[i, :n] = e.soft[1][:n].float()
        soft_ids, soft_probs = soft_ids.to(dev), soft_probs.to(dev)
    answer_index = torch.arange(width, device=dev).view(1, width).expand(b, width)
    example = torch.arange(b, device=dev).view(b, 1).expand(b, width)
    mem = None
    if use_knowledge:  # assembled outside autocast (which refuses some dtype mixes in cat)
        mem = KnowledgeBatch.stack([knowledge_of(e, knowledge, draft) for e in batch], draft.head_weight, dev,
                                   work_dtype)
    rows = draft.head_weight[vocab.to(dev)]
    outputs: list[StepOutput] = []
    z0 = target = None
    with _autocast(draft):
        cache = DraftCache() if steps > 1 else None
        feats = exact
        positions = torch.arange(longest, device=dev).view(1, longest).expand(b, longest)
        for step in range(steps):
            if step == 0:
                h = draft.upper(hidden, feats, cache=cache)
            else:
                mask = chain_mask(longest, step, dev, draft.dtype).expand(b, 1, longest, (step + 1) * longest)
                h = draft.upper(hidden, feats, cache=cache, mask=mask, position_ids=positions)
            ha = torch.gather(h, 1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, A, H]
            za = draft.final(ha, mem, use_knowledge)
            logits = za @ rows.T
            scored = valid & (answer_index >= step)
            outputs.append(StepOutput(logits[scored].float(), labels[scored], answer_index[scored],
                                      example[scored], soft_ids[scored] if soft_ids is not None else None,
                                      soft_probs[scored] if soft_probs is not None else None))
            if step == 0 and features:
                z0 = za[valid]
                target = torch.cat([e.features[e.first : e.first + len(e.answer)] for e in batch]).to(dev)
            if step + 1 < steps:
                # Next step: answer positions t >= first+1 read the draft's own estimate of position t-1.
                nxt = exact.clone()
                src = za.detach().to(nxt.dtype)
                for i, e in enumerate(batch):
                    n = len(e.answer)
                    if n > 1:
                        nxt[i, e.first + 1 : e.first + n] = src[i, : n - 1]
                feats = nxt
    return outputs, z0, target


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------


def _by_depth(matches) -> list[list[bool]]:
    if matches and not isinstance(matches[0], (list, tuple)):
        return [list(matches)]
    return [list(m) for m in matches]


def simulate_steps(matches, gamma: int) -> tuple[int, int]:
    """Greedy speculative decoding along one answer with draft length ``gamma``: (verify steps, accepted drafts).

    Each step drafts ``gamma`` tokens; the base model accepts them up to the first disagreement and adds one token
    of its own (Leviathan et al.). ``matches`` is a list of booleans (token t is right given the true prefix), or one
    such list per draft depth: ``matches[d][t]`` whether the (d+1)-th token of a draft is right when it lands on
    token t (deeper drafts read the draft's own estimates; depths beyond the list reuse the deepest)."""
    depth = _by_depth(matches)
    n, pos, steps, accepted = len(depth[0]), 0, 0, 0
    while pos < n:
        a = 0
        while a < gamma and pos + a < n and depth[min(a, len(depth) - 1)][pos + a]:
            a += 1
        accepted += a
        pos += a + 1
        steps += 1
    return steps, accepted


def simulate_with_stop(matches, confidences, gamma: int, threshold: float) -> tuple[int, int, int]:
    """Like :func:`simulate_steps` with Kangaroo's confidence exit: after the first drafted token, drafting stops
    before a token whose draft probability is below ``threshold``. Returns (steps, accepted, drafted). Accepted
    counts are exact; drafted ones past a rejection use the teacher-forced confidences (an approximation)."""
    depth, conf = _by_depth(matches), _by_depth(confidences)
    n, pos, steps, accepted, drafted = len(depth[0]), 0, 0, 0, 0
    while pos < n:
        length = 0
        while length < gamma and pos + length < n and (
                length == 0 or conf[min(length, len(conf) - 1)][pos + length] >= threshold):
            length += 1
        a = 0
        while a < length and depth[min(a, len(depth) - 1)][pos + a]:
            a += 1
        drafted += length
        accepted += a
        pos += a + 1
        steps += 1
    return steps, accepted, drafted


def summarise(match_lists, losses: Sequence[float] | None = None) -> dict[str, Any]:
    """Metrics over sequences: each item a list of booleans, or a list of them per draft depth."""
    seqs = [_by_depth(m) for m in match_lists]
    tokens = sum(len(d[0]) for d in seqs)
    agree = sum(sum(d[0]) for d in seqs)
    out: dict[str, Any] = {"tokens": tokens, "sequences": len(seqs),
                           "top1_agreement": round(agree / tokens, 4) if tokens else 0.0}
    depth = max((len(d) for d in seqs), default=1)
    if depth > 1:
        per = []
        for k in range(depth):
            hits = [m for d in seqs if len(d) > k for m in d[k][k:]]
            per.append(round(sum(hits) / len(hits), 4) if hits else 0.0)
        out["agreement_by_draft_position"] = per
    per_len = {}
    for g in DRAFT_LENGTHS:
        steps = accepted = 0
        for d in seqs:
            s, a = simulate_steps(d, g)
            steps += s
            accepted += a
        per_len[str(g)] = {"tokens_per_step": round(tokens / steps, 3) if steps else 0.0,
                           "accepted_per_step": round(accepted / steps, 3) if steps else 0.0}
    out["draft_lengths"] = per_len
    if losses:
        out["loss"] = round(sum(losses) / len(losses), 4)
    return out


def match_vectors(draft: DraftModel, e: Example, knowledge: dict[str, PairKnowledge], use_knowledge: bool = True,
                  full_vocab: bool = False, steps: int = 3,
                  use_features: bool = True) -> tuple[list[list[bool]], list[list[float]], float | None]:
    """Per draft depth and answer token: does the draft agree, its confidence in its own top token, and the
    depth-0 cross-entropy — with the vocabulary it would have at generation time (static ids + prompt +
    knowledge)."""
    with torch.no_grad():
        k = knowledge_of(e, knowledge, draft)
        vocab = torch.arange(draft.vocab_size) if full_vocab else draft.vocab_for(e.prompt, k.next_ids)
        outs, _, _ = draft_outputs(draft, [e], knowledge, vocab, draft.vocab_index(vocab), use_knowledge, steps,
                                   use_features)
        n = len(e.answer)
        matches, confs, loss = [], [], None
        for d, o in enumerate(outs):
            m = [False] * n
            c = [0.0] * n
            probs = torch.softmax(o.logits, -1)
            conf, pred = probs.max(-1)
            for a, ok, cf in zip(o.answer_index.tolist(), (pred == o.labels).tolist(), conf.tolist()):
                m[a], c[a] = ok, cf
            matches.append(m)
            confs.append(c)
            if d == 0:
                ok = o.labels >= 0
                if ok.any():
                    loss = float(F.cross_entropy(o.logits[ok], o.labels[ok]))
    return matches, confs, loss


def evaluate(draft: DraftModel, examples: Sequence[Example], knowledge: dict[str, PairKnowledge],
             use_knowledge: bool = True, full_vocab: bool = False, steps: int = 3,
             use_features: bool = True) -> dict[str, Any]:
    """Teacher-forced agreement with the base model's greedy answers (depth 0: the first drafted token) and the
    simulated acceptance of longer drafts (deeper unrolled steps)."""
    was = draft.training
    draft.eval()
    me = distributed.current()
    # Under torchrun each rank measures every world-th example; the results are gathered back into their order, so
    # every rank computes the same summary, equal to one process measuring them all.
    mine = []
    for i in range(me.rank, len(examples), me.world):
        m, _, loss = match_vectors(draft, examples[i], knowledge, use_knowledge, full_vocab, steps, use_features)
        mine.append((i, m, loss))
    draft.train(was)
    results = sorted((r for part in distributed.all_gather(mine) for r in part), key=lambda r: r[0])
    return summarise([m for _, m, _ in results], [loss for _, _, loss in results if loss is not None])


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------


def _optimizer(draft: DraftModel, lr: float, knowledge_lr: float) -> torch.optim.Optimizer:
    groups = []
    # The trained layers and the feature fusion (which feeds them) at the fine-tuning rate: the fusion starts at
    # zero, and larger steps on it knock the copied layers off their inputs.
    layer_params = [p for name, p in draft.named_parameters()
                    if p.requires_grad and name.startswith(("layers.", "fuse.", "feature_norm."))]
    if layer_params:
        groups.append({"params": layer_params, "lr": lr, "weight_decay": 0.0})
    gains = {id(p) for p in draft.knowledge.gains()}
    taken = {id(p) for p in layer_params} | gains
    new = [p for p in draft.parameters() if p.requires_grad and id(p) not in taken]
    groups.append({"params": new, "lr": knowledge_lr, "weight_decay": 0.0})
    # Per-head scalars (temperature, sink, pointer gain) need to move by O(1): a larger step.
    groups.append({"params": list(draft.knowledge.gains()), "lr": knowledge_lr * GAIN_LR_FACTOR, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def batch_loss(draft: DraftModel, batch: Sequence[Example], knowledge: dict[str, PairKnowledge], vocab: torch.Tensor,
               index: torch.Tensor, use_knowledge: bool = True, steps: int = 1,
               feature_weight: float = 0.0, soft_weight: float = 0.0) -> torch.Tensor:
    """The training loss of one batch: token cross-entropy of every unrolled step, plus the weighted cross-entropy
    to the base model's top-k distribution (renormalised over the draft vocabulary) and the weighted feature loss."""
    outs, z0, target = draft_outputs(draft, batch, knowledge, vocab, index, use_knowledge, steps)
    losses = []
    for o in outs:
        parts = []
        ok = o.labels >= 0
        if ok.any():
            parts.append(F.cross_entropy(o.logits[ok], o.labels[ok]))
        if soft_weight and o.soft_ids is not None and o.soft_ids.shape[0]:
            p = o.soft_probs * (o.soft_ids >= 0)  # [M, k], ids outside the draft vocabulary dropped
            p = p / p.sum(-1, keepdim=True).clamp(min=1e-6)
            logq = torch.log_softmax(o.logits, dim=-1).gather(1, o.soft_ids.clamp(min=0))  # [M, k]
            parts.append(soft_weight * -(p * logq).sum(-1).mean())
        if parts:
            losses.append(sum(parts))
    loss = torch.stack(losses).mean()
    if feature_weight and z0 is not None:
        loss = loss + feature_weight * F.smooth_l1_loss(z0.float(), target.float())
    return loss


class BatchLoss(torch.nn.Module):
    """:func:`batch_loss` as a module's forward, for DistributedDataParallel.

    The draft has no single forward that training runs (``draft_outputs`` calls its trunk, fusion, knowledge module
    and head separately), and DDP reduces gradients only for work done inside its own ``forward`` call; so DDP wraps
    this module, whose forward is the whole loss and returns a plain tensor (what DDP's graph walk needs). The draft is
    its only submodule and is saved as itself, so checkpoint keys carry no ``module.`` prefix."""

    def __init__(self, draft: DraftModel):
        super().__init__()
        self.draft = draft

    def forward(self, batch, knowledge, vocab, index, use_knowledge, steps, feature_weight, soft_weight=0.0):
        loss = batch_loss(self.draft, batch, knowledge, vocab, index, use_knowledge, steps, feature_weight,
                          soft_weight)
        # Every trained parameter takes part in every step (adding 0 leaves the gradients as they are): DDP waits for
        # a gradient of each one, and a batch that skips a module (e.g. examples without knowledge) would stall it.
        return loss + 0.0 * sum(p.sum() for p in self.draft.trainable_parameters())


def ddp_wrap(draft: DraftModel):
    """The draft's loss under DistributedDataParallel (gloo on CPU, NCCL on GPUs; rank 0's weights broadcast)."""
    from torch.nn.parallel import DistributedDataParallel

    # No buffer sync per forward: the only buffer (the static vocabulary) never changes after construction.
    return DistributedDataParallel(BatchLoss(draft), device_ids=None, forward_sync_buffers=False)


def rank_batches(n: int, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1) -> list[tuple[list[int], float]]:
    """This rank's share of each batch of one epoch, and the weight of its loss.

    The epoch's order and batches are the single-process ones (shuffled by ``seed``, cut every ``batch_size``), so
    the optimiser takes the same steps with the same global batch; rank r takes every world-th example of each batch.
    DDP averages the ranks' gradients, so a rank's mean loss is weighted by world * (its examples) / (batch size):
    the average is then the gradient of the example-weighted mean. A rank left without examples (a last batch smaller
    than the world) still runs one with weight 0: every rank must take part in every gradient all-reduce."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out = []
    for i in range(0, n, batch_size):
        full = order[i : i + batch_size]
        part = full[rank::world]
        out.append((part, world * len(part) / len(full)) if part else (full[:1], 0.0))
    return out


def train_epoch(draft: DraftModel, optimizer, examples: Sequence[Example], knowledge: dict[str, PairKnowledge],
                vocab: torch.Tensor, batch_size: int, seed: int, feature_weight: float = 0.0, bar=None,
                use_knowledge: bool = True, steps: int = 1, ddp=None, soft_weight: float = 0.0) -> float:
    """One pass over ``examples``; returns the mean loss (token cross-entropy of every unrolled step, plus the
    weighted feature loss). With ``ddp`` (from :func:`ddp_wrap`, under torchrun) each rank runs its share of every
    batch and the returned loss is the mean over all ranks' examples."""
    draft.train()
    me = distributed.current() if ddp is not None else distributed.Rank()
    index = draft.vocab_index(vocab)
    total, count = 0.0, 0
    params = draft.trainable_parameters()
    for part, weight in rank_batches(len(examples), batch_size, seed, me.rank, me.world):
        batch = [examples[j] for j in part]
        if ddp is None:
            loss = batch_loss(draft, batch, knowledge, vocab, index, use_knowledge, steps, feature_weight,
                              soft_weight)
            scaled = loss
        else:
            loss = ddp(batch, knowledge, vocab, index, use_knowledge, steps, feature_weight, soft_weight)
            scaled = loss * weight
        optimizer.zero_grad(set_to_none=True)
        if ddp is None:
            scaled.backward()
        else:
            with distributed.collective("the gradient all-reduce"):
                scaled.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        n = len(batch) if weight else 0
        total += loss.item() * n
        count += n
        if bar is not None:
            done = round(len(batch) * me.world / weight) if weight and me.world > 1 else n
            bar.update(done)
            bar.set_postfix_str(f"loss {total / max(count, 1):.3f}", refresh=False)
    if ddp is not None:
        total, count = distributed.all_reduce_sum([total, count])
    return total / max(count, 1)


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kvdb-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"cannot write checkpoints to {out} ({exc.strerror or exc}); pass --out with a writable "
                         "folder") from None


def _write_log(out: Path, log: dict[str, Any]) -> Path:
    path = out / LOG_FILE
    atomic_write_bytes(path, json.dumps(log, indent=1).encode())
    return path


def _plot(out: Path, history: list[dict[str, Any]], baseline: dict[str, Any] | None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from kvdb.fileio import atomic_path

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    held = [(h["epoch"], h["heldout"].get("loss")) for h in history if h.get("heldout", {}).get("loss") is not None]
    if held:
        ax1.plot([e for e, _ in held], [v for _, v in held], "s-", label="held-out loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [h["heldout"]["top1_agreement"] for h in history], "o-", label="draft top-1 agreement")
    ax2.plot(epochs, [h["heldout"]["draft_lengths"]["4"]["accepted_per_step"] / 4 for h in history], "^--",
             label="accepted per step / 4 (k=4)")
    if baseline:
        ax2.axhline(baseline["top1_agreement"], color="grey", linestyle=":", label="untrained early exit")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_ylabel("held-out acceptance")
    ax2.legend()
    fig.tight_layout()
    path = out / PLOT_FILE
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _resume_state(out: Path, lm, draft_cfg: DraftConfig) -> tuple[dict[str, Any], Path] | None:
    from kvdb.draft import latest_checkpoint

    last = out / LAST_FILE
    path = last if last.is_file() else latest_checkpoint(out)
    if path is None:
        return None
    payload = read_checkpoint(path)
    check_compatible(payload, lm, draft_cfg, path)
    return payload, path


def train(runtime, epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
          resume: bool = False, cache: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          eval_only: bool = False, progress: bool = True, lm=None, references_for: ReferencesFor | None = None,
          checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or with ``eval_only`` evaluate) the draft; returns final metrics and the checkpoint paths.

    ``epochs`` is how many epochs this call runs (default ``training.num_epochs``); with ``resume`` numbering
    continues from the latest checkpoint in ``out``, and a run that stopped before its planned epochs finishes them.
    """
    from tqdm import tqdm

    from kvdb.draft import best_checkpoint, latest_checkpoint
    from kvdb.lm import load_model

    t_start = time.perf_counter()
    cfg: Config = runtime.config
    tcfg, dcfg = cfg.training, cfg.draft
    batch_size = batch_size or tcfg.batch_size
    lr = lr if lr is not None else tcfg.learning_rate
    if batch_size < 1 or lr <= 0 or (epochs is not None and epochs < 0):
        raise ValidationError("--batch-size must be at least 1, --lr above 0 and --epochs at least 0")
    out = Path(out) if out is not None else runtime.home.checkpoints_dir
    if not eval_only:
        _check_out_dir(out)
    torch.manual_seed(tcfg.seed)
    if lm is None:
        lm = load_model(cfg.model, runtime.home)

    # A checkpoint to continue from or evaluate: checked before any heavy work.
    payload, ckpt_path = None, None
    if eval_only:
        ckpt_path = Path(checkpoint) if checkpoint else (best_checkpoint(out) or latest_checkpoint(out))
        if ckpt_path is None:
            raise NotFoundError(f"no draft checkpoint in {out}; run `kvdb train` first")
        payload = read_checkpoint(ckpt_path)
        dcfg = check_compatible(payload, lm, dcfg, ckpt_path)
    elif resume:
        found = _resume_state(out, lm, dcfg)
        if found is None:
            raise NotFoundError(f"--resume: no draft checkpoint in {out} to continue from; train without --resume")
        payload, ckpt_path = found
        dcfg = draft_config_from(payload)

    # Under torchrun rank 0 computes (and stores) the base model's answers while the others wait; they then prepare
    # the same data from what it stored, computing no answer twice.
    me = distributed.current()
    with distributed.main_first():
        data = prepare(runtime, lm, dcfg, cache=cache, references_for=references_for,
                       progress=progress and me.is_main)
    t_data = time.perf_counter()

    # The draft vocabulary: frequent ids + every token of the training data (prompts, answers, knowledge).
    tokens = [torch.tensor(e.prompt + e.answer) for e in data.train]
    tokens += [k.next_ids for k in data.knowledge.values()]
    tokens += [e.recorded.next_ids for e in data.train if e.recorded is not None]
    static = torch.arange(min(dcfg.vocab_frequent, lm.model.get_output_embeddings().weight.shape[0])) \
        if dcfg.vocab_frequent else None
    if static is not None:
        static = torch.unique(torch.cat([static, *[torch.tensor(e.answer) for e in data.train]]))
    draft = DraftModel(lm, dcfg, static_vocab=static)
    if payload is not None:
        try:
            draft.load_state_dict(payload["state_dict"], strict=True)
        except (RuntimeError, KeyError) as exc:
            raise CorruptError(f"{ckpt_path} does not fit the draft it describes "
                               f"({str(exc).strip().splitlines()[0][:160]}); train again") from None
    else:
        all_keys = torch.cat([k.keys for k in data.knowledge.values()])
        draft.knowledge.set_statistics(all_keys)
    # Trained parameters in fp32 (master weights); with a bf16 base model the forward runs under autocast.
    draft.float()
    train_vocab = draft.vocab_for(*tokens) if dcfg.vocab_frequent else torch.arange(draft.vocab_size)
    steps = max(1, tcfg.unroll_steps) if dcfg.use_base_features else 1

    eval_set = data.heldout or data.train
    eval_name = "heldout" if data.heldout else "train (no held-out split)"
    needed = list(eval_set) if eval_only else data.train + data.heldout
    frozen_states(draft, needed)
    if dcfg.use_base_features:
        data.info["features_computed"] = teacher_features(lm, needed, progress=progress and me.is_main)
    if tcfg.soft_target_weight and not eval_only:
        if not 1 <= tcfg.soft_target_top_k <= lm.model.get_output_embeddings().weight.shape[0]:
            raise ValidationError(f"training.soft_target_top_k must be between 1 and the vocabulary size; got "
                                  f"{tcfg.soft_target_top_k}")
        data.info["soft_targets_computed"] = teacher_soft_targets(lm, data.train, tcfg.soft_target_top_k,
                                                                  progress=progress and me.is_main)
    t_states = time.perf_counter()

    # The untrained early exit: fresh copies of the same layers (so the inputs computed above fit), full head.
    baseline = evaluate(DraftModel(lm, dataclasses.replace(dcfg, vocab_frequent=0)), eval_set, data.knowledge,
                        use_knowledge=False, full_vocab=True, steps=1, use_features=False)
    result: dict[str, Any] = {"out": str(out), "eval_set": eval_name, "data": data.info,
                              "untrained_early_exit": baseline, "draft_config": dataclasses.asdict(dcfg)}
    if eval_only:
        metrics = evaluate(draft, eval_set, data.knowledge, steps=steps)
        result.update({"checkpoint": str(ckpt_path), "epoch": payload["epoch"], "metrics": metrics,
                       "without_knowledge": evaluate(draft, eval_set, data.knowledge, use_knowledge=False,
                                                     steps=steps),
                       "seconds": round(time.perf_counter() - t_start, 2)})
        return result

    optimizer = _optimizer(draft, lr, tcfg.knowledge_learning_rate)
    history: list[dict[str, Any]] = []
    start_epoch, planned = 0, epochs if epochs is not None else tcfg.num_epochs
    best_metric, best_path = -1.0, None
    if payload is not None:
        if payload.get("optimizer"):
            try:
                optimizer.load_state_dict(payload["optimizer"])
            except (ValueError, KeyError, RuntimeError):
                pass  # a different optimiser layout: continue with fresh moments
        start_epoch = int(payload["epoch"])
        history = list(payload.get("history") or [])
        training_info = payload.get("training") or {}
        best_metric = float(training_info.get("best_metric", -1.0))
        best_path = training_info.get("best_path")
        target = int(training_info.get("target_epoch", start_epoch))
        planned = epochs if epochs is not None else (target - start_epoch if target > start_epoch
                                                      else tcfg.num_epochs)
    if len(draft.layers):
        optimizer.param_groups[0]["lr"] = lr  # a resumed run may be given another --lr
    end_epoch = start_epoch + planned

    log = {"format": "kvdb.train_log", "base_model": lm.describe(), "draft_config": dataclasses.asdict(dcfg),
           "training": {"batch_size": batch_size, "lr": lr, **dataclasses.asdict(tcfg)}, "data": data.info,
           "eval_set": eval_name, "untrained_early_exit": baseline, "epochs": history}
    if me.distributed:
        log["training"]["ranks"] = result["ranks"] = me.world
    checkpoints: list[str] = []
    log_path = plot_path = None
    total_steps = len(data.train) * planned
    bar = tqdm(total=total_steps, unit="ex", desc="train", disable=not progress or total_steps == 0 or not me.is_main,
               dynamic_ncols=True)
    ddp = ddp_wrap(draft) if me.distributed else None
    try:
        for epoch in range(start_epoch + 1, end_epoch + 1):
            t0 = time.perf_counter()
            bar.set_description(f"epoch {epoch}/{end_epoch}")
            loss = train_epoch(draft, optimizer, data.train, data.knowledge, train_vocab, batch_size,
                               seed=tcfg.seed + epoch, feature_weight=tcfg.feature_loss_weight,
                               soft_weight=tcfg.soft_target_weight, bar=bar,
                               steps=steps, ddp=ddp)
            train_seconds = time.perf_counter() - t0
            held = evaluate(draft, eval_set, data.knowledge, steps=steps)
            record = {"epoch": epoch, "train_loss": round(loss, 4), "heldout": held,
                      "seconds": round(train_seconds, 2), "eval_seconds": round(time.perf_counter() - t0 -
                                                                                train_seconds, 2)}
            history.append(record)
            improved = held["top1_agreement"] > best_metric
            training_info = {"best_metric": max(best_metric, held["top1_agreement"]), "best_path": best_path,
                             "target_epoch": end_epoch, "batch_size": batch_size, "lr": lr,
                             "prompt_format": PROMPT_FORMAT, "data": data.info}
            state = optimizer.state_dict()
            metrics = {"train_loss": record["train_loss"], "heldout": held, "untrained_early_exit": baseline}
            # Every rank keeps the same bookkeeping (the metric is the same on all); rank 0 alone writes files.
            if improved:
                best_metric = held["top1_agreement"]
                superseded = best_path if best_path in checkpoints else None
                best_path = str(out / f"best_draft_model_epoch{epoch}.pth")
                training_info.update(best_metric=best_metric, best_path=best_path)
                if me.is_main:
                    save_checkpoint(Path(best_path), draft, epoch=epoch, metrics=metrics, optimizer_state=state,
                                    training=training_info, history=history)
                checkpoints.append(best_path)
                if superseded:  # this run's previous best (~140 MB for SmolLM2): the new one replaces it
                    if me.is_main:
                        Path(superseded).unlink(missing_ok=True)
                    checkpoints.remove(superseded)
            if tcfg.save_every > 0 and epoch % tcfg.save_every == 0:
                path = out / f"draft_model_epoch{epoch}.pth"
                if me.is_main:
                    save_checkpoint(path, draft, epoch=epoch, metrics=metrics, optimizer_state=state,
                                    training=training_info, history=history)
                checkpoints.append(str(path))
            log["epochs"] = history
            if me.is_main:
                save_checkpoint(out / LAST_FILE, draft, epoch=epoch, metrics=metrics, optimizer_state=state,
                                training=training_info, history=history)
                log_path = _write_log(out, log)
                plot_path = _plot(out, history, baseline)
            bar.set_postfix_str(f"loss {loss:.3f} agree {held['top1_agreement']:.3f}", refresh=True)
    finally:
        bar.close()
    final = history[-1] if history else None
    result.update({
        "epoch": history[-1]["epoch"] if history else start_epoch,
        "epochs_run": end_epoch - start_epoch,
        "metrics": final["heldout"] if final else evaluate(draft, eval_set, data.knowledge, steps=steps),
        "train_loss": final["train_loss"] if final else None,
        "best": {"metric": best_metric, "path": best_path},
        "checkpoints": checkpoints,
        "last_checkpoint": str(out / LAST_FILE) if history else None,
        "log": str(log_path) if log_path else None,
        "plot": str(plot_path) if plot_path else None,
        "seconds_data": round(t_data - t_start, 2),
        "seconds_states": round(t_states - t_data, 2),
        "seconds": round(time.perf_counter() - t_start, 2),
    })
    return result
