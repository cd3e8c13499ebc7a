"""The teacher: the base model's greedy answers (the draft's distillation targets) and its states over them.

``decode_grouped`` answers many prompts at once, running each shared prefix (the system turn with its references)
once per group; ``compute_answers`` reuses what kvdb.recorded already holds and records the rest a batch at a time,
so an interrupted run resumes where it stopped. ``fill_answer_states`` adds to the recordings of pairs' own questions
the base model's states over each answer, which the draft attends to as knowledge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from kvdb.errors import CorruptError
from kvdb.lm import new_cache, pad_right
from kvdb.prompt import PROMPT_FORMAT, common_prefix_length
from kvdb.recorded import AnswerBook, AnswerRequest

log = logging.getLogger(__name__)


# -- batched greedy decoding over shared prefixes ------------------------------------------------------------------
def _prefill(lm, groups: Sequence[Sequence[Sequence[int]]], pad: int):
    """Run each group's shared prefix once, then every prompt's own tail on a copy of its group's cache.
    Returns (logits after each prompt [R, V], cache, attention mask [R, T], position of each row's last token)."""
    model, dev = lm.model, lm.device
    cuts = [min(common_prefix_length(g), min(len(p) for p in g) - 1) for g in groups]  # every row keeps a tail token
    width = max(cuts)
    cache = new_cache(model)
    owner = torch.tensor([i for i, g in enumerate(groups) for _ in g], device=dev)
    mask = torch.zeros((len(owner), 0), dtype=torch.long, device=dev)
    if width:
        ids, mask = pad_right([g[0][:c] for g, c in zip(groups, cuts)], pad, width, left=True)
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_select_indices(owner)
        mask = mask[owner]
    tails = [p[c:] for g, c in zip(groups, cuts) for p in g]
    span = max(len(t) for t in tails)
    tail_ids, tail_mask = pad_right(tails, pad, span, left=True)
    mask = torch.cat([mask, tail_mask.to(dev)], dim=-1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=tail_ids.to(dev), attention_mask=mask, position_ids=pos[:, -span:], cache=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits, cache, mask, pos[:, -1]


@torch.inference_mode()
def decode_grouped(lm, groups: Sequence[Sequence[Sequence[int]]], max_new_tokens: int) -> list[list[list[int]]]:
    """Greedy answers of several groups of prompts (per group, per prompt: the generated ids); the prompts of a
    group share a prefix, which is run once per group.

    Layout of row r (a prompt of group g): ``[pad..][prefix_g][pad..][tail_r][answer..]`` with an attention mask
    that hides the pads and positions that count real tokens only, so each row computes what it would alone.
    Rows that finish are dropped from the batch as they go; each answer ends at its first end-of-turn token."""
    dev = lm.device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eos_ids[0]
    eos = torch.tensor(sorted(set(lm.eos_ids)), device=dev)
    logits, cache, mask, last_pos = _prefill(lm, groups, pad)
    rows = torch.arange(mask.shape[0], device=dev)  # which answer each live batch row belongs to
    answers: list[list[int]] = [[] for _ in range(mask.shape[0])]
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # [B]
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
        logits = lm.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                          cache=cache, use_cache=True).logits[:, -1]
    out, i = [], 0
    for g in groups:
        out.append(answers[i : i + len(g)])
        i += len(g)
    return out


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
                    progress: bool = False) -> dict[str, int]:
    """Fill ``output`` of every request: reuse recorded answers, generate the rest (grouped by shared prompt prefix,
    about ``batch_size`` rows a batch) and record each batch as it finishes."""
    from tqdm import tqdm

    book.lookup(requests)
    book.tag(requests)
    todo = [r for r in requests if r.output is None]
    bar = tqdm(total=len(todo), unit="answer", desc="base answers", disable=not progress or not todo, leave=False,
               dynamic_ncols=True)
    try:
        for batch in prefix_batches(todo, lambda r: r.group if r.group is not None else id(r), batch_size):
            got = decode_grouped(book.lm, [[r.prompt for r in g] for g in batch], book.max_new_tokens)
            for g, answers in zip(batch, got):
                for r, answer in zip(g, answers):
                    r.output = answer
            done = [r for g in batch for r in g]
            book.record(done)  # each batch is kept: an interrupted run resumes here
            bar.update(len(done))
    finally:
        bar.close()
    return {"recorded": len(todo), "reused": len(requests) - len(todo)}


# -- the base model's states over its answers ----------------------------------------------------------------------
def answer_states(lm, answers: Sequence[tuple[list[int], list[int]]], layers: Sequence[int]) -> list[dict]:
    """For each (prompt, answer): the base model's ``layers`` states at the positions that predicted each answer
    token, {"layer_<L>": [len(answer), H] fp16}; one padded forward pass over prompt + answer[:-1]."""
    from kvdb.build import layer_states

    states = layer_states(lm, [list(p) + list(a)[:-1] for p, a in answers], list(layers))
    return [{k: v[len(p) - 1 :] for k, v in st.items()} for (p, _), st in zip(answers, states)]


def _recordings_without_states(runtime, fingerprint: str, names: Sequence[str]) -> list[tuple[str, str, dict]]:
    """(pair hash, checksum, tensors) of the own-question recordings that lack some of the ``names`` states."""
    from sqlalchemy import select

    from kvdb.store.blobs import unpack
    from kvdb.store.models import BaseAnswer

    todo = []
    with runtime.store.read() as session:
        for row in session.scalars(select(BaseAnswer).where(BaseAnswer.fingerprint == fingerprint,
                                                            BaseAnswer.prompt_format == PROMPT_FORMAT)):
            try:
                t = unpack(row.data, row.checksum, f"base answer of pair {row.pair_hash[:12]}")
            except CorruptError:
                continue  # recomputed when its answer is next needed
            if t["output_ids"].numel() and any(n not in t for n in names):
                todo.append((row.pair_hash, row.checksum, t))
    return sorted(todo, key=lambda x: x[2]["prompt_ids"].numel() + x[2]["output_ids"].numel())


def _write_states(runtime, fingerprint: str, chunk: Sequence[tuple[str, str, dict]], states: list[dict]) -> int:
    """Store the states with their recordings (one transaction); a row replaced meanwhile is left alone."""
    from sqlalchemy import select

    from kvdb.store.blobs import pack
    from kvdb.store.models import BaseAnswer

    filled = 0
    with runtime.store.write() as session:
        for (pair_hash, checksum, t), extra in zip(chunk, states):
            row = session.scalars(select(BaseAnswer).where(
                BaseAnswer.pair_hash == pair_hash, BaseAnswer.fingerprint == fingerprint,
                BaseAnswer.prompt_format == PROMPT_FORMAT)).first()
            if row is None or row.checksum != checksum:
                continue
            row.data, row.checksum = pack({**t, **extra})
            filled += 1
    return filled


def fill_answer_states(runtime, lm, layers: Sequence[int], batch_size: int = 4, progress: bool = False) -> int:
    """Add the base model's ``layers`` states over each stored own-question answer (one row per answer token: the
    state at the position that predicted it) to the recordings that lack them; returns how many were filled.

    They are computed by one forward pass over prompt + answer rather than captured while generating, so
    recordings made by `kvdb query` get them too, the next time training runs."""
    from tqdm import tqdm

    todo = _recordings_without_states(runtime, lm.fingerprint, [f"layer_{n}" for n in layers])
    bar = tqdm(total=len(todo), unit="answer", desc="answer states", disable=not progress or not todo, leave=False,
               dynamic_ncols=True)
    filled = 0
    try:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            pairs = [(t["prompt_ids"].tolist(), t["output_ids"].tolist()) for _, _, t in chunk]
            filled += _write_states(runtime, lm.fingerprint, chunk, answer_states(lm, pairs, layers))
            bar.update(len(chunk))
    finally:
        bar.close()
    return filled

