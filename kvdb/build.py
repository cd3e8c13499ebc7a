"""`kvdb build`: prefill every pair that lacks vectors for the current model, and embed every pair that lacks an
embedding for the current embedder.

Per pair the stored sequence is exactly what the model would see had it answered the question itself:
``chat(user: question, generation prompt) + answer tokens + end-of-turn``; ``answer_start`` is the index of the first
answer token. Hidden states are taken with forward hooks on the decoder layers (the raw output of layer L, before any
final norm), in right-padded batches sorted by length, without the LM head. Each batch is written in one
transaction, so an interrupted build resumes where it stopped and never leaves half a pair.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sqlalchemy import and_, delete, select
from sqlalchemy.orm import Session

from kvdb import distributed
from kvdb.config import Config, Home
from kvdb.embed import load_embedder
from kvdb.identity import EmbedderRef, ModelRef, resolve_embedder, resolve_model
from kvdb.errors import ValidationError
from kvdb.lm import LM, LayerTap, load_model, pad_right
from kvdb.store.basemodels import ensure_model
from kvdb.store.blobs import pack
from kvdb.store.db import Store
from kvdb.store.models import Embedding, Pair, PairVectors
from kvdb.store.pairs import domain_id


def resolve_layers(spec: Sequence[int], num_layers: int) -> list[int]:
    """Config layers (1-based, negatives from the end) -> sorted unique 1-based layer numbers."""
    out = set()
    for layer in spec:
        resolved = layer if layer > 0 else num_layers + 1 + layer
        if not 1 <= resolved <= num_layers:
            raise ValidationError(f"build.layers has {layer}, but the model has layers 1..{num_layers}")
        out.add(resolved)
    return sorted(out)


@dataclass
class PairText:
    hash: str
    question: str
    answer: str
    variants: list[str]


@dataclass
class PairTokens:
    pair: PairText
    ids: list[int]
    answer_start: int


@dataclass
class BuildReport:
    built: int = 0
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)
    model: str | None = None
    embedder: str | None = None
    ranks: list[dict[str, Any]] | None = None  # under torchrun: each rank's share (built, embedded, tokens, seconds)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if d["ranks"] is None:
            del d["ranks"]
        d["tokens_per_second"] = round(self.tokens / self.seconds, 1) if self.seconds else 0.0
        return d


def pair_sequence(lm: LM, pair: PairText) -> PairTokens:
    prompt = lm.chat_ids([{"role": "user", "content": pair.question}], add_generation_prompt=True)
    answer = lm.encode(pair.answer)
    return PairTokens(pair, prompt + answer + [lm.eos_ids[0]], len(prompt))


@torch.inference_mode()
def layer_states(lm: LM, seqs: list[list[int]], layers: list[int]) -> list[dict[str, torch.Tensor]]:
    """One padded forward pass over the token lists ``seqs``; per sequence {layer_<L>: [T, H]} on the CPU (fp16)."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eos_ids[0]
    ids, mask = pad_right(seqs, pad)  # [B, T] each
    with LayerTap(lm.model, layers) as tap:
        lm.decoder(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    states = {layer: tap.outputs[layer].to("cpu", torch.float16) for layer in layers}  # [B, T, H] each
    return [{f"layer_{layer}": states[layer][i, : len(s)].clone() for layer in layers} for i, s in enumerate(seqs)]


def prefill_batch(lm: LM, seqs: list[PairTokens], layers: list[int]) -> list[dict[str, torch.Tensor]]:
    """One padded forward pass over ``seqs``; returns per sequence {token_ids, layer_<L>} on the CPU (fp16)."""
    states = layer_states(lm, [s.ids for s in seqs], layers)
    return [{"token_ids": torch.tensor(s.ids, dtype=torch.int32), **st} for s, st in zip(seqs, states)]


def _texts_for_embedding(pair: PairText) -> dict[str, list[str]]:
    fields = {"question": [pair.question], "answer": [pair.answer]}
    if pair.variants:
        fields["variants"] = pair.variants
    return fields


def _pair_text(row: Pair) -> PairText:
    variants = (row.meta or {}).get("variants") or []
    variants = [v for v in variants if isinstance(v, str) and v.strip()] if isinstance(variants, list) else []
    return PairText(row.hash, row.question, row.answer, variants)


class Builder:
    def __init__(self, config: Config, home: Home, store: Store):
        self.config = config
        self.home = home
        self.store = store
        self.model_ref: ModelRef = resolve_model(config.model, home)
        self.embedder_ref: EmbedderRef = resolve_embedder(config.embedder, home, self.model_ref.fingerprint)
        self._lm: LM | None = None
        self._embedder = None

    def lm(self) -> LM:
        if self._lm is None:
            self._lm = load_model(self.config.model, self.home, ref=self.model_ref)
        return self._lm

    def embedder(self):
        if self._embedder is None:
            needs_lm = self.embedder_ref.source == "base-mean"
            self._embedder = load_embedder(self.embedder_ref, self.config.embedder,
                                           lm=self.lm() if needs_lm else None, device=self.config.model.device)
        return self._embedder

    def plan(self, session: Session, domain: str | None, rebuild: bool) -> tuple[list[PairText], list[PairText], int]:
        """(pairs needing vectors, pairs needing embeddings, pairs in scope) — reads the store only."""
        scope = select(Pair).order_by(Pair.id)
        if domain is not None:
            scope = scope.where(Pair.domain_id == domain_id(session, domain))
        fp, key = self.model_ref.fingerprint, self.embedder_ref.key
        if rebuild:
            rows = [_pair_text(r) for r in session.scalars(scope)]
            return rows, rows, len(rows)
        total = len(session.scalars(scope.with_only_columns(Pair.id)).all())
        need_vec = session.scalars(
            scope.outerjoin(PairVectors, and_(PairVectors.pair_hash == Pair.hash, PairVectors.fingerprint == fp))
            .where(PairVectors.id.is_(None))
        ).all()
        need_emb = session.scalars(
            scope.outerjoin(Embedding, and_(Embedding.pair_hash == Pair.hash, Embedding.embedder == key))
            .where(Embedding.id.is_(None))
        ).all()
        return [_pair_text(r) for r in need_vec], [_pair_text(r) for r in need_emb], total

    def run(self, domain: str | None = None, batch_size: int | None = None, rebuild: bool = False,
            progress: bool = True, shard: tuple[int, int] = (0, 1)) -> BuildReport:
        """Build what is missing. ``shard=(rank, world)`` (torchrun) splits the work between ``world`` processes.

        Sharding is by prefill batch, not by pair: every rank forms the batches the single-process build forms (the
        same pairs, sorted by length, cut every ``batch_size``) and prefills its share of them, balanced by padded
        tokens, so each pair is built once and its vectors are exactly the single-process ones. Under a process
        group rank 0's plan is broadcast (so a rank that starts late, after others wrote, plans nothing different)
        and the report returned on every rank covers all ranks."""
        rank, world = shard
        if not 0 <= rank < world:
            raise ValidationError(f"shard {rank} of {world} does not exist (need 0 <= rank < world)")
        report = BuildReport(model=self.model_ref.name, embedder=self.embedder_ref.key)
        plan = None
        if rank == 0 or not distributed.current().distributed:
            with self.store.read() as session:
                plan = self.plan(session, domain, rebuild)
        need_vec, need_emb, total = distributed.broadcast(plan) if world > 1 else plan
        todo = {p.hash: p for p in need_vec} | {p.hash: p for p in need_emb}
        report.skipped = total - len(todo) if rank == 0 else 0
        start = time.perf_counter()
        if todo:
            self._run_share(todo, need_vec, need_emb, max(1, batch_size or self.config.build.batch_size), rebuild,
                            report, progress, rank, world)
            report.seconds = time.perf_counter() - start
        return _combine(report) if world > 1 else report

    def _run_share(self, todo: dict[str, PairText], need_vec: list[PairText], need_emb: list[PairText], batch: int,
                   rebuild: bool, report: BuildReport, progress: bool, rank: int, world: int) -> None:
        vec_hashes = {p.hash for p in need_vec}
        emb_hashes = {p.hash for p in need_emb}
        groups: list[list[PairTokens]] = []
        prefilled: set[str] = set()
        layers: list[int] = []
        failed: list[dict[str, str]] = []
        if vec_hashes:
            lm = self.lm()
            layers = resolve_layers(self.config.build.layers, lm.num_layers)
            self._ensure_model_row(lm, layers)
            seqs = []
            for pair in (todo[h] for h in todo if h in vec_hashes):
                seq = pair_sequence(lm, pair)
                if len(seq.ids) > min(self.config.build.max_tokens, lm.max_positions):
                    failed.append({"hash": pair.hash, "reason": f"{len(seq.ids)} tokens, over build.max_tokens"})
                    continue
                seqs.append(seq)
            seqs.sort(key=lambda s: len(s.ids))  # similar lengths together: little padding
            groups = [seqs[i : i + batch] for i in range(0, len(seqs), batch)]
            prefilled = {s.pair.hash for s in seqs}
            owner = distributed.assign([len(g) * len(g[-1].ids) for g in groups], world) if world > 1 else \
                [0] * len(groups)
            groups = [g for g, r in zip(groups, owner) if r == rank]
        # Pairs that need only an embedding (or whose prefill failed): chunks of 64, every world-th one here.
        rest = [todo[h] for h in todo if h in emb_hashes and h not in prefilled]
        chunks = [rest[i : i + 64] for i in range(0, len(rest), 64)][rank::world]
        if rank == 0:
            report.failed += len(failed)
            report.failures += failed
        mine = sum(len(g) for g in groups) + sum(1 for c in chunks for p in c if p.hash not in vec_hashes)
        bar = _progress(mine + (len(failed) if rank == 0 else 0), progress,
                        "build" if world == 1 else f"build [rank {rank}]")
        try:
            bar.update(len(failed) if rank == 0 else 0)
            if groups:
                self._build_vectors(groups, layers, rebuild, emb_hashes, report, bar)
            for chunk in chunks:
                self._write(chunk, {}, self._embed(chunk), rebuild)
                report.embedded += len(chunk)
                bar.update(sum(1 for p in chunk if p.hash not in vec_hashes))
        finally:
            bar.close()

    def _build_vectors(self, groups: list[list[PairTokens]], layers: list[int], rebuild: bool, emb_hashes: set[str],
                       report: BuildReport, bar) -> None:
        """Prefill each batch of ``groups``; embed those of its pairs in ``emb_hashes`` alongside."""
        lm = self.lm()
        t0 = time.perf_counter()
        for group in groups:
            tensors = prefill_batch(lm, group, layers)
            vectors = {s.pair.hash: (s, t) for s, t in zip(group, tensors)}
            to_embed = [s.pair for s in group if s.pair.hash in emb_hashes]
            embeddings = self._embed(to_embed) if to_embed else {}
            self._write([s.pair for s in group], vectors, embeddings, rebuild, layers)
            report.built += len(group)
            report.embedded += len(embeddings)
            report.tokens += sum(len(s.ids) for s in group)
            bar.update(len(group))
            bar.set_postfix_str(f"{report.tokens / (time.perf_counter() - t0):.0f} tok/s", refresh=False)

    def _embed(self, pairs: list[PairText]) -> dict[str, dict[str, np.ndarray]]:
        embedder = self.embedder()
        texts, owners = [], []
        for pair in pairs:
            for field_name, values in _texts_for_embedding(pair).items():
                texts += values
                owners += [(pair.hash, field_name)] * len(values)
        vectors = embedder.embed(texts) if texts else np.zeros((0, embedder.dim), np.float32)
        out: dict[str, dict[str, list[np.ndarray]]] = {}
        for (h, field_name), vec in zip(owners, vectors):
            out.setdefault(h, {}).setdefault(field_name, []).append(vec)
        return {h: {f: np.stack(v) for f, v in fields.items()} for h, fields in out.items()}

    def _ensure_model_row(self, lm: LM, layers: list[int]) -> None:
        with self.store.write() as session:
            ensure_model(session, lm.fingerprint, name=lm.ref.name, source=lm.ref.source, hidden_size=lm.hidden_size,
                         num_layers=lm.num_layers, info={**lm.describe(), "layers": layers})

    def _write(self, pairs: list[PairText], vectors: dict, embeddings: dict, rebuild: bool,
               layers: list[int] | None = None) -> None:
        """One transaction per batch; pairs removed meanwhile are dropped, rows another builder wrote are kept."""
        hashes = [p.hash for p in pairs]
        fp, key = self.model_ref.fingerprint, self.embedder_ref.key
        with self.store.write() as session:
            alive = set(session.scalars(select(Pair.hash).where(Pair.hash.in_(hashes))))
            if vectors:
                if rebuild:
                    session.execute(delete(PairVectors).where(PairVectors.fingerprint == fp,
                                                              PairVectors.pair_hash.in_(hashes)))
                have = set(session.scalars(select(PairVectors.pair_hash).where(
                    PairVectors.fingerprint == fp, PairVectors.pair_hash.in_(hashes))))
                for h, (seq, tensors) in vectors.items():
                    if h not in alive or h in have:
                        continue
                    data, digest = pack(tensors)
                    session.add(PairVectors(pair_hash=h, fingerprint=fp, layers=layers, num_tokens=len(seq.ids),
                                            answer_start=seq.answer_start, data=data, checksum=digest))
            if embeddings:
                if rebuild:
                    session.execute(delete(Embedding).where(Embedding.embedder == key,
                                                            Embedding.pair_hash.in_(list(embeddings))))
                have = set(session.scalars(select(Embedding.pair_hash).where(
                    Embedding.embedder == key, Embedding.pair_hash.in_(list(embeddings)))))
                for h, fields in embeddings.items():
                    if h not in alive or h in have:
                        continue
                    data, digest = pack({f: torch.from_numpy(v) for f, v in fields.items()})
                    session.add(Embedding(pair_hash=h, embedder=key, dim=int(fields["question"].shape[-1]),
                                          data=data, checksum=digest))
                self.store.bump_revision(session)


def _combine(report: BuildReport) -> BuildReport:
    """The report of all ranks: counts summed, seconds the slowest rank's (the wall time of the whole build),
    failures gathered in rank order."""
    own = {"built": report.built, "embedded": report.embedded, "tokens": report.tokens,
           "seconds": round(report.seconds, 3)}
    report.ranks = distributed.all_gather(own)
    counts = distributed.all_reduce_sum([report.built, report.embedded, report.skipped, report.failed,
                                         report.tokens])
    report.built, report.embedded, report.skipped, report.failed, report.tokens = (int(c) for c in counts)
    report.seconds = distributed.all_reduce_max([report.seconds])[0]
    report.failures = [f for part in distributed.all_gather(report.failures) for f in part]
    return report


def _progress(total: int, enabled: bool, desc: str = "build"):
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
