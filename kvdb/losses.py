"""The draft's training loss: cross-entropy of its logits (over the draft vocabulary) against the base model's greedy
tokens at the answer positions (distillation), teacher-forced. Along an accepted prefix a token-only draft's inputs
are exactly the teacher-forced ones, so no unrolling is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvdb.draft import DraftModel, Knowledge, KnowledgeBatch, PairKnowledge, knowledge_for
from kvdb.train_data import Example


def knowledge_of(ex: Example, knowledge: dict[str, PairKnowledge], draft: DraftModel) -> Knowledge:
    """What the draft attends to for ``ex``: its recorded answer, then its references' vectors."""
    return knowledge_for(draft, [knowledge[h] for h in ex.refs if h in knowledge], ex.recorded)


def autocast(draft: DraftModel):
    """fp32 trained weights with a half-precision base model: compute in the base model's dtype."""
    if draft.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(draft.device.type, dtype=draft.dtype)
    return contextlib.nullcontext()


@dataclass
class DraftOutput:
    logits: torch.Tensor  # [M, V'] at the answer positions of the batch
    labels: torch.Tensor  # [M] vocabulary positions of the base model's tokens (-1: outside the vocabulary)
    answer_index: torch.Tensor  # [M] which answer token each row predicts
    example: torch.Tensor  # [M] which example of the batch


def _answer_positions(batch: Sequence[Example], index: torch.Tensor, dev) -> tuple[torch.Tensor, ...]:
    """Positions [B, A] (position first + a predicts answer[a]), which are real, and their labels."""
    b, width = len(batch), max(len(e.answer) for e in batch)
    pos = torch.zeros(b, width, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    labels = torch.full((b, width), -1, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.answer)
        pos[i, :n] = torch.arange(e.first, e.first + n)
        valid[i, :n] = True
        labels[i, :n] = index[torch.tensor(e.answer)]
    return pos.to(dev), valid.to(dev), labels.to(dev)


def draft_outputs(draft: DraftModel, batch: Sequence[Example], knowledge: dict[str, PairKnowledge],
                  vocab: torch.Tensor, index: torch.Tensor, use_knowledge: bool = True) -> DraftOutput:
    """Teacher-forced draft logits at every answer position of a batch, from the trained layers' inputs
    (``Example.states``, see kvdb.train.frozen_states)."""
    dev = draft.device
    work_dtype = next(draft.layers.parameters()).dtype if len(draft.layers) else draft.dtype
    b, longest = len(batch), max(len(e.ids) for e in batch)
    hidden = torch.zeros(b, longest, draft.hidden_size, dtype=work_dtype, device=dev)
    for i, e in enumerate(batch):
        hidden[i, : len(e.ids)] = e.states.to(dev, work_dtype)
    pos, valid, labels = _answer_positions(batch, index, dev)
    width = pos.shape[1]
    answer_index = torch.arange(width, device=dev).view(1, width).expand(b, width)
    example = torch.arange(b, device=dev).view(b, 1).expand(b, width)
    mem = None
    if use_knowledge:  # assembled outside autocast (which refuses some dtype mixes in cat)
        mem = KnowledgeBatch.stack([knowledge_of(e, knowledge, draft) for e in batch], draft.head_weight, dev,
                                   work_dtype)
    rows = draft.head_weight[vocab.to(dev)]
    with autocast(draft):
        h = draft.upper(hidden)
        ha = torch.gather(h, 1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, A, H]
        logits = draft.final(ha, mem, use_knowledge) @ rows.T
    return DraftOutput(logits[valid].float(), labels[valid], answer_index[valid], example[valid])


def batch_loss(draft: DraftModel, batch: Sequence[Example], knowledge: dict[str, PairKnowledge], vocab: torch.Tensor,
               index: torch.Tensor, use_knowledge: bool = True) -> torch.Tensor:
    """The training loss of one batch: token cross-entropy over the answer positions whose token is in the draft
    vocabulary."""
    out = draft_outputs(draft, batch, knowledge, vocab, index, use_knowledge)
    ok = out.labels >= 0
    if not ok.any():
        return out.logits.sum() * 0.0  # keeps the graph (and DDP's all-reduce) alive
    return F.cross_entropy(out.logits[ok], out.labels[ok])


class BatchLoss(torch.nn.Module):
    """:func:`batch_loss` as a module's forward, for DistributedDataParallel.

    The draft has no single forward that training runs (``draft_outputs`` calls its trunk, knowledge module and head
    separately), and DDP reduces gradients only for work done inside its own ``forward`` call; so DDP wraps this
    module, whose forward is the whole loss and returns a plain tensor (what DDP's graph walk needs). The draft is
    its only submodule and is saved as itself, so checkpoint keys carry no ``module.`` prefix."""

    def __init__(self, draft: DraftModel):
        super().__init__()
        self.draft = draft

    def forward(self, batch, knowledge, vocab, index, use_knowledge):
        loss = batch_loss(self.draft, batch, knowledge, vocab, index, use_knowledge)
        # Every trained parameter takes part in every step (adding 0 leaves the gradients as they are): DDP waits for
        # a gradient of each one, and a batch that skips a module (e.g. examples without knowledge) would stall it.
        return loss + 0.0 * sum(p.sum() for p in self.draft.trainable_parameters())
