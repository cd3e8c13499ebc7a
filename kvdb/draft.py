"""The knowledge-aware draft model: the base model's first layers, a knowledge module, the base's own norm and head.

Shape of one draft step (B sequences, T new tokens, N knowledge slots, V' draft-vocabulary tokens)::

    ids [B,T] ─embed (base, frozen)─> layers 1..n (1..n-t shared with the base, n-t+1..n trained copies) ─> h [B,T,H]
    z = final_norm(h)                                       # the untrained early exit stops here
    z = z + knowledge(h, keys [B,N,H], values [B,N,H], pointers [B,N,H])
    logits [B,T,V'] = z @ head[vocab].T

The knowledge is what ``kvdb build`` stored for the retrieved pairs: per answer position s the output of layer n
(the key: same layers as the draft, so "where am I in this answer" is a similarity the untrained draft already has),
the last layer's output (the value: after the final norm it *is* the base model's prediction of the token after s),
and the token at s+1 (the pointer: copy it). A learned sink lets a head attend to nothing.

Only what training changes goes into a checkpoint: the trained layers and the knowledge module. The
embedding, the frozen first layers, the final norm and the LM head stay the base model's and are shared, never
duplicated. ``LearnedDraftSource`` drafts for kvdb.decode with its own KV cache; ``load_draft`` reads a checkpoint.

The draft vocabulary is a subset of the base vocabulary (the most frequent ids, every token the knowledge and the
prompt hold, the end-of-turn ids): SmolLM2's head is 49152x576, as costly as ~8 of its decoder layers, and the base
model verifies every drafted token, so a smaller head changes speed only, never the output.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvdb.config import DraftConfig
from kvdb.errors import CorruptError, ForeignFileError, NotBuiltError, NotFoundError, ValidationError

CHECKPOINT_FORMAT = "kvdb.draft_checkpoint"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# knowledge: the stored vectors of the retrieved pairs, as the draft reads them
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PairKnowledge:
    """One pair's slots: answer positions s = answer_start-1 .. T-2 (each predicts the token at s+1)."""

    hash: str
    keys: torch.Tensor  # [n, H] fp16, output of layer num_sampled_layers at s
    values: torch.Tensor  # [n, H] fp16, output of the last layer at s (pre final norm)
    next_ids: torch.Tensor  # [n] long, token at s+1

    @classmethod
    def from_vectors(cls, pair_hash: str, tensors: dict[str, torch.Tensor], answer_start: int, key_layer: int,
                     value_layer: int) -> "PairKnowledge":
        names = (f"layer_{key_layer}", f"layer_{value_layer}")
        missing = [n for n in names if n not in tensors]
        if missing or "token_ids" not in tensors:
            raise NotBuiltError(
                f"the stored vectors of pair {pair_hash[:12]} lack {', '.join(missing) or 'token_ids'}; the draft "
                f"needs layers {key_layer} and {value_layer}: set build.layers to [{key_layer}, -1] and run "
                "`kvdb build --rebuild`"
            )
        ids = tensors["token_ids"].long()
        total = int(ids.shape[0])
        start = max(int(answer_start) - 1, 0)
        if not 0 < answer_start < total:
            raise CorruptError(f"the stored vectors of pair {pair_hash[:12]} have answer start {answer_start} "
                               f"outside 1..{total - 1}; run `kvdb build --rebuild`")
        keys, values = tensors[names[0]], tensors[names[1]]
        if keys.shape[0] != total or values.shape[0] != total:
            raise CorruptError(f"the stored vectors of pair {pair_hash[:12]} disagree in length with their tokens; "
                               "run `kvdb build --rebuild`")
        return cls(pair_hash, keys[start : total - 1].to(torch.float16), values[start : total - 1].to(torch.float16),
                   ids[start + 1 : total].clone())

    @classmethod
    def from_answer(cls, pair_hash: str, tensors: dict[str, torch.Tensor], key_layer: int,
                    value_layer: int) -> "PairKnowledge | None":
        """Slots of the base model's recorded answer to the pair's question (``answer_states``: one row per answer
        token, the state that predicted it); None when the recording carries no states of these layers."""
        names = (f"layer_{key_layer}", f"layer_{value_layer}")
        ids = tensors.get("output_ids")
        if ids is None or any(n not in tensors for n in names):
            return None
        keys, values = tensors[names[0]], tensors[names[1]]
        if not (keys.shape[0] == values.shape[0] == ids.shape[0]) or ids.shape[0] == 0:
            return None
        return cls(f"answer:{pair_hash}", keys.to(torch.float16), values.to(torch.float16), ids.long().clone())

    @property
    def size(self) -> int:
        return int(self.next_ids.shape[0])


@dataclass
class Knowledge:
    """The slots of several pairs, concatenated in retrieval order and cut at ``max_tokens``."""

    keys: torch.Tensor  # [N, H]
    values: torch.Tensor  # [N, H]
    next_ids: torch.Tensor  # [N] long
    hashes: list[str]

    @classmethod
    def empty(cls, hidden_size: int) -> "Knowledge":
        z = torch.zeros(0, hidden_size, dtype=torch.float16)
        return cls(z, z.clone(), torch.zeros(0, dtype=torch.long), [])

    @classmethod
    def from_pairs(cls, pairs: Sequence[PairKnowledge], max_tokens: int, hidden_size: int) -> "Knowledge":
        keys, values, nxt, hashes, left = [], [], [], [], max_tokens
        for p in pairs:
            if left <= 0:
                break
            take = min(p.size, left)
            keys.append(p.keys[:take])
            values.append(p.values[:take])
            nxt.append(p.next_ids[:take])
            hashes.append(p.hash)
            left -= take
        if not keys:
            return cls.empty(hidden_size)
        return cls(torch.cat(keys), torch.cat(values), torch.cat(nxt), hashes)

    @property
    def size(self) -> int:
        return int(self.next_ids.shape[0])


def load_pair_knowledge(store, fingerprint: str, hashes: Sequence[str], key_layer: int,
                        value_layer: int) -> list[PairKnowledge]:
    """Read the stored vectors of ``hashes`` (in that order) for one base model; pairs without vectors are refused."""
    from sqlalchemy import select

    from kvdb.store.blobs import unpack
    from kvdb.store.models import PairVectors

    hashes = list(hashes)
    if not hashes:
        return []
    with store.read() as session:
        rows = {r.pair_hash: r for r in session.scalars(select(PairVectors).where(
            PairVectors.fingerprint == fingerprint, PairVectors.pair_hash.in_(hashes)))}
        out = []
        for h in hashes:
            row = rows.get(h)
            if row is None:
                raise NotBuiltError(f"pair {h[:12]} has no vectors for the current model; run `kvdb build`")
            tensors = unpack(row.data, row.checksum, f"vectors of pair {h[:12]}")
            out.append(PairKnowledge.from_vectors(h, tensors, row.answer_start, key_layer, value_layer))
    return out


def load_recorded_knowledge(store, fingerprint: str, hashes: Sequence[str], key_layer: int,
                            value_layer: int) -> dict[str, PairKnowledge]:
    """Slots of the base model's recorded answers to the pairs ``hashes`` (current prompt format); recordings
    without states, or damaged ones, are left out (they only cost the draft some accuracy)."""
    from sqlalchemy import select

    from kvdb.prompt import PROMPT_FORMAT
    from kvdb.store.blobs import unpack
    from kvdb.store.models import BaseAnswer

    out: dict[str, PairKnowledge] = {}
    hashes = list(hashes)
    if not hashes:
        return out
    with store.read() as session:
        for row in session.scalars(select(BaseAnswer).where(
                BaseAnswer.fingerprint == fingerprint, BaseAnswer.prompt_format == PROMPT_FORMAT,
                BaseAnswer.pair_hash.in_(hashes))):
            try:
                tensors = unpack(row.data, row.checksum, f"base answer of pair {row.pair_hash[:12]}")
            except CorruptError:
                continue
            got = PairKnowledge.from_answer(row.pair_hash, tensors, key_layer, value_layer)
            if got is not None:
                out[row.pair_hash] = got
    return out


def knowledge_for(draft: "DraftModel", refs: Sequence[PairKnowledge], recorded: PairKnowledge | None) -> Knowledge:
    """What the draft attends to: the recorded answer to the top pair's question first (when the draft was trained
    with it), then the retrieved pairs' stored vectors, in retrieval order, cut at ``max_knowledge_tokens``."""
    first = [recorded] if recorded is not None and draft.cfg.recorded_knowledge else []
    return Knowledge.from_pairs(first + list(refs), draft.cfg.max_knowledge_tokens, draft.hidden_size)


def load_knowledge(store, draft: "DraftModel", hashes: Sequence[str]) -> Knowledge:
    """The knowledge a draft attends to for one query: the stored vectors of the retrieved pairs ``hashes`` and,
    for a draft trained with it, the recorded answer to the top pair's question."""
    pairs = load_pair_knowledge(store, draft.fingerprint, hashes, draft.key_layer, draft.value_layer)
    recorded = None
    if draft.cfg.recorded_knowledge and hashes:
        recorded = load_recorded_knowledge(store, draft.fingerprint, list(hashes)[:1], draft.key_layer,
                                           draft.value_layer).get(list(hashes)[0])
    return knowledge_for(draft, pairs, recorded)


@dataclass
class KnowledgeBatch:
    """Knowledge of B sequences, padded to the longest: what the model's forward takes."""

    keys: torch.Tensor  # [B, N, H]
    values: torch.Tensor  # [B, N, H]
    pointers: torch.Tensor  # [B, N, H] head row of each slot's next token, unit RMS
    mask: torch.Tensor  # [B, N] bool, True for real slots
    projected: tuple[torch.Tensor, torch.Tensor] | None = None  # (k, v) per head, cached when drafting

    @classmethod
    def stack(cls, items: Sequence[Knowledge], head_weight: torch.Tensor, device, dtype) -> "KnowledgeBatch":
        hidden = head_weight.shape[-1]
        n = max(1, max(k.size for k in items))
        b = len(items)
        keys = torch.zeros(b, n, hidden, dtype=dtype, device=device)
        values = torch.zeros(b, n, hidden, dtype=dtype, device=device)
        pointers = torch.zeros(b, n, hidden, dtype=dtype, device=device)
        mask = torch.zeros(b, n, dtype=torch.bool, device=device)
        for i, k in enumerate(items):
            m = k.size
            if m:
                keys[i, :m] = k.keys.to(device, dtype)
                values[i, :m] = k.values.to(device, dtype)
                rows = head_weight[k.next_ids.to(head_weight.device)].detach().float()
                rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6)
                pointers[i, :m] = rows.to(device, dtype)
                mask[i, :m] = True
        return cls(keys, values, pointers, mask)


# ---------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KnowledgeAttention(nn.Module):
    """Cross-attention from the draft's state to the stored slots, with a sink for "nothing here" and a pointer.

    Per head h and slot s: score = <q_h, k_h,s> * temperature (+ a sink slot of learned score, value zero).
    The output added to the draft's final hidden state is ``o(sum_s a_s v_s) + sum_h copy_h sum_s a_hs u_s``, where
    v_s is the base model's own final state at s (after its norm it predicts the token after s) and u_s is the head
    row of that next token, scaled to unit RMS: adding it raises exactly that token's logit (a pointer, in the same
    units as the model's own logits whatever the model).

    Initialised as a no-op (zero output projection, zero pointer gains) whose attention already ranks slots by the
    cosine of standardised layer-n states: the draft and the store share those layers, so the best slot is usually
    the aligned position of the reference answer from the first step of training.
    """

    TEMPERATURE = 10.0  # score of a slot identical to the query, before training

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if heads < 1 or hidden % heads:
            raise ValidationError(f"draft.knowledge_heads must divide the hidden size {hidden}; got {heads}")
        self.heads, self.head_dim = heads, hidden // heads
        self.q_norm, self.k_norm = RMSNorm(hidden), RMSNorm(hidden)
        self.v_norm = RMSNorm(hidden)
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        with torch.no_grad():
            for lin in (self.q, self.k, self.v):
                lin.weight.copy_(torch.eye(hidden))
            self.o.weight.zero_()
        # Per head: temperature (log), the sink's score, the pointer gain. Trained with a larger step (gains()).
        self.log_scale = nn.Parameter(torch.zeros(heads))
        self.sink = nn.Parameter(torch.full((heads,), 0.5 * self.TEMPERATURE))
        self.copy = nn.Parameter(torch.zeros(heads))
        # Standardisation of keys and queries (per-channel mean and scale of stored keys); set from data.
        self.register_buffer("center", torch.zeros(hidden), persistent=True)
        self.register_buffer("spread", torch.ones(hidden), persistent=True)

    def gains(self) -> list[nn.Parameter]:
        return [self.log_scale, self.sink, self.copy]

    def set_statistics(self, keys: torch.Tensor) -> None:
        """Centre and scale channels by the stored keys (layer-n states have a few huge channels that would
        otherwise decide every cosine)."""
        keys = keys.float()
        self.center.copy_(keys.mean(0))
        self.spread.copy_(keys.std(0).clamp(min=1e-3) if keys.shape[0] > 1 else torch.ones_like(self.spread))

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center.to(x.dtype)) / self.spread.to(x.dtype)

    def project(self, mem: "KnowledgeBatch") -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values per head, [B, nh, N, d] each: fixed for one query's knowledge, so drafting computes
        them once (``mem.projected``) rather than at every token (they cost more than a decoder layer)."""
        b, n, _ = mem.keys.shape
        nh, d = self.heads, self.head_dim
        k = self.k(self.k_norm(self._standardise(mem.keys))).view(b, n, nh, d).transpose(1, 2)
        v = self.v(self.v_norm(mem.values)).view(b, n, nh, d).transpose(1, 2)
        return k, v

    def forward(self, h: torch.Tensor, mem: "KnowledgeBatch") -> torch.Tensor:
        b, t, hidden = h.shape
        n = mem.keys.shape[1]
        nh, d = self.heads, self.head_dim
        q = self.q(self.q_norm(self._standardise(h))).view(b, t, nh, d).transpose(1, 2)  # [B, nh, T, d]
        k, v = mem.projected if mem.projected is not None else self.project(mem)  # [B, nh, N, d] each
        scale = self.log_scale.exp().view(1, nh, 1, 1) * (self.TEMPERATURE / d)
        scores = (q @ k.transpose(-1, -2)) * scale.to(q.dtype)  # [B, nh, T, N]
        scores = scores.masked_fill(~mem.mask.view(b, 1, 1, n), torch.finfo(scores.dtype).min)
        sink = self.sink.view(1, nh, 1, 1).to(scores.dtype).expand(b, nh, t, 1)
        attn = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :n]  # [B, nh, T, N]
        out = self.o((attn @ v).transpose(1, 2).reshape(b, t, hidden))  # [B, T, H]
        pointer = torch.einsum("bhtn,h->btn", attn, self.copy.to(attn.dtype)) @ mem.pointers  # [B, T, H]
        return out + pointer


class DraftCache:
    """A minimal KV cache for the draft's layers that the decoder layers of transformers accept
    (``update(keys, values, layer_idx)``), with ``crop`` to roll back rejected tokens."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx in self.keys:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=-2)
        else:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if not self.keys:
            return 0
        first = self.keys.get(layer_idx, next(iter(self.keys.values())))
        return int(first.shape[-2])

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions."""
        for i in list(self.keys):
            self.keys[i] = self.keys[i][..., :length, :]
            self.values[i] = self.values[i][..., :length, :]


def _cache_kwarg(layer: nn.Module) -> str:
    """The name transformers gives the cache argument of a decoder layer (it changed across versions)."""
    params = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    return "cache"


class DraftModel(nn.Module):
    """See the module docstring. ``lm`` is a loaded :class:`kvdb.lm.LM`; its modules are shared, not copied, except
    the trained layers."""

    def __init__(self, lm, cfg: DraftConfig, static_vocab: torch.Tensor | None = None):
        super().__init__()
        n = cfg.num_sampled_layers
        t = n if cfg.trainable_layers is None else cfg.trainable_layers
        if not 1 <= n < lm.num_layers:
            raise ValidationError(f"draft.num_sampled_layers must be between 1 and {lm.num_layers - 1} for "
                                  f"{lm.ref.name}; got {n}")
        if not 0 <= t <= n:
            raise ValidationError(f"draft.trainable_layers must be between 0 and num_sampled_layers ({n}); got {t}")
        import copy

        self.cfg = cfg
        self.heldout_top1: float | None = None  # set by load_draft from the checkpoint's metrics
        self.fingerprint: str = lm.fingerprint
        self.base_name: str = lm.ref.name
        self.hidden_size: int = lm.hidden_size
        self.vocab_size: int = lm.model.get_output_embeddings().weight.shape[0]
        self.key_layer, self.value_layer = n, lm.num_layers
        self.frozen_layers = n - t  # layers 1..n-t are the base's own modules
        # Shared with the base model (not registered as submodules, so never in state_dict or the optimiser).
        self._shared = {
            "embed": lm.decoder.embed_tokens, "norm": lm.decoder.norm, "rotary": lm.decoder.rotary_emb,
            "head": lm.model.get_output_embeddings(), "frozen": list(lm.layers[: self.frozen_layers]),
        }
        self._attn_impl = getattr(lm.model.config, "_attn_implementation", "sdpa") or "sdpa"
        trained = [copy.deepcopy(layer) for layer in lm.layers[self.frozen_layers : n]]
        self.layers = nn.ModuleList(trained)
        for p in self.layers.parameters():
            p.requires_grad_(True)
        self.knowledge = KnowledgeAttention(lm.hidden_size, cfg.knowledge_heads)
        self.knowledge.to(lm.device, lm.dtype)
        eos = sorted(set(lm.eos_ids))
        if static_vocab is None:
            static_vocab = torch.arange(min(cfg.vocab_frequent, self.vocab_size)) if cfg.vocab_frequent > 0 \
                else torch.arange(self.vocab_size)
        self.register_buffer("static_vocab", torch.unique(torch.cat([static_vocab.long().cpu(), torch.tensor(eos)])),
                             persistent=True)
        self._cache_arg = _cache_kwarg(lm.layers[0])

    # -- shared pieces ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._shared["norm"].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._shared["norm"].weight.dtype

    @property
    def head_weight(self) -> torch.Tensor:
        return self._shared["head"].weight

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- vocabulary ---------------------------------------------------------------------------------------------
    def vocab_for(self, *token_lists: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """The draft vocabulary: the static ids plus every id in ``token_lists`` (sorted, unique, long)."""
        if not self.cfg.vocab_frequent:
            return torch.arange(self.vocab_size)
        parts = [self.static_vocab.cpu()]
        for tokens in token_lists:
            t = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(list(tokens), dtype=torch.long)
            parts.append(t.long().flatten().cpu())
        vocab = torch.unique(torch.cat(parts))
        return vocab[(vocab >= 0) & (vocab < self.vocab_size)]

    def vocab_index(self, vocab: torch.Tensor) -> torch.Tensor:
        """[vocab_size] long: position of each id in ``vocab``, -1 where absent."""
        index = torch.full((self.vocab_size,), -1, dtype=torch.long)
        index[vocab] = torch.arange(len(vocab))
        return index

    # -- forward ------------------------------------------------------------------------------------------------
    def _mask(self, t: int, past: int, b: int) -> torch.Tensor | None:
        """Causal mask for T new tokens after ``past`` cached ones; None where the attention can do it alone."""
        if t == 1:
            return None
        if past == 0 and self._attn_impl == "sdpa":
            return None  # sdpa's is_causal
        q = torch.arange(t, device=self.device).view(t, 1) + past
        k = torch.arange(past + t, device=self.device).view(1, past + t)
        mask = torch.zeros(t, past + t, dtype=self.dtype, device=self.device)
        mask.masked_fill_(k > q, torch.finfo(self.dtype).min)
        return mask.view(1, 1, t, past + t).expand(b, 1, t, past + t)

    def run_layers(self, hidden: torch.Tensor, layers: Sequence[nn.Module], past: int = 0,
                   cache: DraftCache | None = None) -> torch.Tensor:
        b, t, _ = hidden.shape
        position_ids = (torch.arange(t, device=hidden.device) + past).unsqueeze(0).expand(b, t)
        mask = self._mask(t, past, b)
        position_embeddings = self._shared["rotary"](hidden, position_ids)
        for layer in layers:
            out = layer(hidden, attention_mask=mask, position_ids=position_ids,
                        position_embeddings=position_embeddings, use_cache=cache is not None,
                        **{self._cache_arg: cache})
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def lower(self, input_ids: torch.Tensor, past: int = 0, cache: DraftCache | None = None) -> torch.Tensor:
        """ids [B,T] -> the output of the frozen layers (the embeddings when there are none) [B,T,H]."""
        hidden = self._shared["embed"](input_ids)
        if self.frozen_layers:
            hidden = self.run_layers(hidden, self._shared["frozen"], past, cache)
        return hidden

    def upper(self, hidden: torch.Tensor, past: int = 0, cache: DraftCache | None = None) -> torch.Tensor:
        """Frozen-layer output [B,T,H] -> layer n output h (the trained layers)."""
        return self.run_layers(hidden, self.layers, past, cache)

    def trunk(self, input_ids: torch.Tensor, past: int = 0, cache: DraftCache | None = None) -> torch.Tensor:
        """ids [B,T] -> h [B,T,H]: the output of layer n (pre-norm)."""
        return self.upper(self.lower(input_ids, past, cache), past, cache)

    def final(self, h: torch.Tensor, mem: KnowledgeBatch | None, use_knowledge: bool = True) -> torch.Tensor:
        """h [B,T,H] (layer n output) -> z [B,T,H], the state the head reads."""
        z = self._shared["norm"](h)
        if use_knowledge and mem is not None and mem.keys.shape[1] > 0:
            z = z + self.knowledge(h, mem).to(z.dtype)
        return z

    def head(self, h: torch.Tensor, head_rows: torch.Tensor, mem: KnowledgeBatch | None,
             use_knowledge: bool = True) -> torch.Tensor:
        """h [B,T,H] (layer n output) -> logits over the draft vocabulary [B,T,V']."""
        return self.final(h, mem, use_knowledge) @ head_rows.T

    def forward(self, input_ids: torch.Tensor, vocab: torch.Tensor, mem: KnowledgeBatch | None = None,
                use_knowledge: bool = True) -> torch.Tensor:
        """Teacher-forced logits over ``vocab`` for every position: [B, T, V']."""
        h = self.trunk(input_ids)
        return self.head(h, self.head_weight[vocab.to(self.device)], mem, use_knowledge)

    # -- persistence --------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"base_name": self.base_name, "fingerprint": self.fingerprint, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "key_layer": self.key_layer, "value_layer": self.value_layer,
                "draft_config": asdict(self.cfg)}

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: trained layers, knowledge module, static vocabulary."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Make a value safe for ``torch.load(weights_only=True)``: dicts/lists/str/int/float/bool/None and tensors."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def save_checkpoint(path: Path, draft: DraftModel, *, epoch: int, metrics: dict[str, Any],
                    optimizer_state: dict | None = None, training: dict[str, Any] | None = None,
                    history: list | None = None) -> Path:
    """Write a self-describing checkpoint atomically (temporary file, fsync, rename)."""
    from kvdb.fileio import atomic_path

    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": _plain(draft.describe()),
        "draft_config": _plain(asdict(draft.cfg)),
        "fingerprint": draft.fingerprint,
        "num_sampled_layers": draft.cfg.num_sampled_layers,
        "epoch": int(epoch),
        "metrics": _plain(metrics),
        "history": _plain(history or []),
        "training": _plain(training or {}),
        "state_dict": draft.trained_state(),
        "optimizer": _plain(optimizer_state) if optimizer_state is not None else None,
    }
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:  # torch's C++ writer reports a failed write as a RuntimeError
        if isinstance(exc, RuntimeError) and "inline_container" not in str(exc) and "StreamWriter" not in str(exc):
            raise
        from kvdb.errors import StoreError

        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "the write failed"
        raise StoreError(f"cannot write the checkpoint {path}: {reason}; check that the folder is "
                         "writable and the disk has space") from None
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check the envelope of a checkpoint (never unpickles objects: ``weights_only=True``)."""
    import warnings
    import zipfile
    from pickle import UnpicklingError

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about a raw pickle's protocol before refusing it: one line only
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError:
        raise ForeignFileError(f"{path} is not a kvdb draft checkpoint (it holds objects that only a pickle of code "
                               "could rebuild, which kvdb never loads)") from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptError(f"{path} cannot be read as a checkpoint ({first[:200]}); delete it or train again") \
            from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ForeignFileError(f"{path} is not a kvdb draft checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ForeignFileError(f"{path} is a draft checkpoint of version {payload.get('version')}, this kvdb reads "
                               f"version {CHECKPOINT_VERSION}; train again")
    for key in ("state_dict", "draft_config", "fingerprint", "epoch"):
        if key not in payload:
            raise CorruptError(f"{path} lacks '{key}'; delete it or train again")
    return payload


def draft_config_from(payload: dict[str, Any]) -> DraftConfig:
    import dataclasses

    known = {f.name for f in dataclasses.fields(DraftConfig)}
    raw = payload.get("draft_config") or {}
    # Checkpoints from before recorded-answer knowledge were trained without it: default them to what they are.
    if not isinstance(raw, dict):
        raise CorruptError("the checkpoint's draft config is malformed; train again")
    raw = {"recorded_knowledge": False, **raw}
    if raw.get("use_base_features"):
        raise ForeignFileError("the checkpoint's draft reads the base model's features, which this kvdb no longer "
                               "supports; train a new draft with `kvdb train`")
    try:
        return DraftConfig(**{k: v for k, v in raw.items() if k in known})
    except TypeError:
        raise CorruptError("the checkpoint's draft config is malformed; train again") from None


def check_compatible(payload: dict[str, Any], lm, cfg: DraftConfig | None, path: Path | str) -> DraftConfig:
    """Refuse a checkpoint made for another base model or another draft shape; returns its draft config."""
    saved = draft_config_from(payload)
    if payload["fingerprint"] != lm.fingerprint:
        made_for = (payload.get("model") or {}).get("base_name", "another model")
        raise ForeignFileError(f"{path} was trained for {made_for} (fingerprint {str(payload['fingerprint'])[:12]}), "
                               f"not the current model {lm.ref.name}; train a draft for this model with `kvdb train`")
    if cfg is not None and saved.num_sampled_layers != cfg.num_sampled_layers:
        raise ForeignFileError(f"{path} has num_sampled_layers={saved.num_sampled_layers} but the config asks for "
                               f"{cfg.num_sampled_layers}; use a matching config or train again")
    return saved


def load_draft(path: str | os.PathLike, lm, cfg: DraftConfig | None = None) -> DraftModel:
    """A trained draft for ``lm`` from a checkpoint (fingerprint and num_sampled_layers are checked)."""
    payload = read_checkpoint(path)
    saved = check_compatible(payload, lm, cfg, path)
    state = payload["state_dict"]
    static = state.get("static_vocab")
    draft = DraftModel(lm, saved, static_vocab=static if isinstance(static, torch.Tensor) else None)
    try:
        draft.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CorruptError(f"{path} does not fit the draft it describes ({first[:160]}); train again") from None
    draft.to(lm.device, lm.dtype)
    draft.eval()
    metrics = payload.get("metrics") if isinstance(payload.get("metrics"), dict) else {}
    held = metrics.get("heldout") if isinstance(metrics.get("heldout"), dict) else {}
    top1 = held.get("top1_agreement")
    draft.heldout_top1 = float(top1) if isinstance(top1, (int, float)) and 0 < top1 < 1 else None
    return draft


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the highest epoch in ``folder`` (periodic or best), newest file on ties."""
    import re

    best: tuple[int, float, Path] | None = None
    if not Path(folder).is_dir():
        return None
    for p in Path(folder).glob("*.pth"):
        m = re.fullmatch(r"(?:best_)?draft_model_epoch(\d+)\.pth", p.name)
        if not m:
            continue
        key = (int(m.group(1)), p.stat().st_mtime, p)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def best_checkpoint(folder: Path) -> Path | None:
    """The most recent ``best_draft_model_epoch<N>.pth`` (highest N)."""
    import re

    found = []
    for p in Path(folder).glob("best_draft_model_epoch*.pth"):
        m = re.fullmatch(r"best_draft_model_epoch(\d+)\.pth", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


# ---------------------------------------------------------------------------------------------------------------
# the draft source for the decoding engine
# ---------------------------------------------------------------------------------------------------------------


class LearnedDraftSource:
    """Draft source protocol of kvdb.decode: ``propose(context, k)`` greedy tokens from the draft, ``observe(...)``.

    Keeps a KV cache of the draft's layers for the tokens it has seen. Each ``propose`` first aligns the cache with
    the context (the longest common prefix survives; rejected draft tokens are cropped away), feeds the new context
    tokens in one forward, then drafts up to ``k`` tokens one at a time.
    """

    name = "learned-draft"
    wants_features: tuple[int, ...] = ()  # reads no base-model hidden states

    def __init__(self, draft: DraftModel, lm, knowledge: Knowledge | None = None, use_knowledge: bool = True):
        self.draft = draft
        self.lm = lm
        self.knowledge = knowledge if knowledge is not None else Knowledge.empty(draft.hidden_size)
        self.use_knowledge = use_knowledge
        self.cache = DraftCache()
        self._ids: list[int] = []  # tokens whose K/V are in the cache
        self._next_logits: torch.Tensor | None = None  # draft logits after the last cached token [V']
        self._vocab: torch.Tensor | None = None
        self._vocab_len = 0  # context length the vocabulary was built from
        self._rows: torch.Tensor | None = None
        self._mem: KnowledgeBatch | None = None
        self.drafted = 0
        self.forwards = 0
        # For DraftPolicy: a draft token costs about the draft's layers (+1 for head and knowledge) over the base
        # model's; the acceptance to expect before any evidence is the held-out top-1 agreement training measured.
        self.token_cost = (draft.cfg.num_sampled_layers + 1) / max(1, lm.num_layers)
        self.prior = getattr(draft, "heldout_top1", None) or 0.3

    def _build_vocab(self, context: list[int]) -> None:
        d = self.draft
        self._vocab = d.vocab_for(context, self.knowledge.next_ids)
        self._rows = d.head_weight[self._vocab.to(d.device)]
        self._mem = None
        if self.knowledge.size and self.use_knowledge:
            self._mem = KnowledgeBatch.stack([self.knowledge], d.head_weight, d.device, d.dtype)
            with torch.inference_mode():
                self._mem.projected = d.knowledge.project(self._mem)
        self._vocab_len = len(context)

    @torch.inference_mode()
    def _feed(self, tokens: list[int]) -> None:
        d = self.draft
        ids = torch.tensor([tokens], dtype=torch.long, device=d.device)
        h = d.trunk(ids, past=len(self._ids), cache=self.cache)[:, -1:]  # only the last position is ever needed
        self._next_logits = d.head(h, self._rows, self._mem, self.use_knowledge)[0, -1]
        self._ids.extend(tokens)
        self.forwards += 1

    def _sync(self, context: list[int]) -> None:
        n = min(len(self._ids), len(context))
        common = n if n and self._ids[:n] == context[:n] else 0
        while common < n and self._ids[common] == context[common]:
            common += 1
        if common < self._vocab_len or self._vocab is None:
            self._build_vocab(context)
        # Keep what is shared and leaves at least the last context token to run again (its logits are the next
        # draft token's).
        keep = min(common, len(context) - 1)
        if keep < len(self._ids):
            self.cache.crop(keep)
            del self._ids[keep:]
        if len(context) > len(self._ids):
            self._feed(context[len(self._ids):])

    def propose(self, context: list[int], k: int) -> list[int]:
        if k <= 0 or not context:
            return []
        self._sync(list(context))
        out: list[int] = []
        for i in range(k):
            token = int(self._vocab[int(self._next_logits.argmax(-1))])
            out.append(token)
            if i + 1 < k:
                self._feed([token])
        self.drafted += len(out)
        return out

    def observe(self, context: list[int], n_accepted: int | None = None,
                features: dict[int, torch.Tensor] | None = None) -> None:
        """Nothing to keep: the next ``propose`` crops the rejected tail itself."""
