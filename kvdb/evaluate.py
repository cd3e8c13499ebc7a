"""Offline acceptance of a draft, on examples whose base-model answers are known.

Top-1 agreement with the base model along its own greedy continuation (the first drafted token), and Leviathan et
al.'s expected tokens per verify step for draft lengths 1, 2, 4, 8, simulated exactly from the agreement pattern:
with greedy acceptance a block is accepted up to its first disagreement, and before it the draft saw the
teacher-forced prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kvdb import distributed
from kvdb.draft import DraftModel, PairKnowledge
from kvdb.losses import draft_outputs, knowledge_of
from kvdb.train_data import Example

DRAFT_LENGTHS = (1, 2, 4, 8)


def simulate_steps(matches: Sequence[bool], gamma: int) -> tuple[int, int]:
    """Greedy speculative decoding along one answer with draft length ``gamma``: (verify steps, accepted drafts).

    Each step drafts ``gamma`` tokens; the base model accepts them up to the first disagreement and adds one token
    of its own (Leviathan et al.). ``matches[t]``: whether the draft's token t is right given the true prefix."""
    n, pos, steps, accepted = len(matches), 0, 0, 0
    while pos < n:
        a = 0
        while a < gamma and pos + a < n and matches[pos + a]:
            a += 1
        accepted += a
        pos += a + 1
        steps += 1
    return steps, accepted


def summarise(match_lists: Sequence[Sequence[bool]], losses: Sequence[float] | None = None) -> dict[str, Any]:
    """Agreement, simulated acceptance per draft length and (given) the mean loss over sequences of matches."""
    tokens = sum(len(m) for m in match_lists)
    agree = sum(sum(m) for m in match_lists)
    out: dict[str, Any] = {"tokens": tokens, "sequences": len(match_lists),
                           "top1_agreement": round(agree / tokens, 4) if tokens else 0.0}
    per_len = {}
    for g in DRAFT_LENGTHS:
        steps = accepted = 0
        for m in match_lists:
            s, a = simulate_steps(m, g)
            steps += s
            accepted += a
        per_len[str(g)] = {"tokens_per_step": round(tokens / steps, 3) if steps else 0.0,
                           "accepted_per_step": round(accepted / steps, 3) if steps else 0.0}
    out["draft_lengths"] = per_len
    if losses:
        out["loss"] = round(sum(losses) / len(losses), 4)
    return out


@torch.no_grad()
def match_vector(draft: DraftModel, e: Example, knowledge: dict[str, PairKnowledge], use_knowledge: bool = True,
                 full_vocab: bool = False) -> tuple[list[bool], float | None]:
    """Per answer token: does the draft agree with the base model; and the cross-entropy, with the vocabulary it
    would have at generation time (static ids + prompt + knowledge)."""
    k = knowledge_of(e, knowledge, draft)
    vocab = torch.arange(draft.vocab_size) if full_vocab else draft.vocab_for(e.prompt, k.next_ids)
    out = draft_outputs(draft, [e], knowledge, vocab, draft.vocab_index(vocab), use_knowledge)
    matches = [False] * len(e.answer)
    for a, ok in zip(out.answer_index.tolist(), (out.logits.argmax(-1) == out.labels).tolist()):
        matches[a] = ok
    known = out.labels >= 0
    loss = float(F.cross_entropy(out.logits[known], out.labels[known])) if known.any() else None
    return matches, loss


def evaluate(draft: DraftModel, examples: Sequence[Example], knowledge: dict[str, PairKnowledge],
             use_knowledge: bool = True, full_vocab: bool = False) -> dict[str, Any]:
    """Teacher-forced agreement with the base model's greedy answers and the simulated acceptance of drafts.

    Under torchrun each rank measures every world-th example; the results are gathered back into their order, so
    every rank computes the same summary, equal to one process measuring them all."""
    was = draft.training
    draft.eval()
    me = distributed.current()
    mine = []
    for i in range(me.rank, len(examples), me.world):
        m, loss = match_vector(draft, examples[i], knowledge, use_knowledge, full_vocab)
        mine.append((i, m, loss))
    draft.train(was)
    results = sorted((r for part in distributed.all_gather(mine) for r in part), key=lambda r: r[0])
    return summarise([m for _, m, _ in results], [loss for _, _, loss in results if loss is not None])
