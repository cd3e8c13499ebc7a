"""Lossless speculative decoding in named phases: prefill, propose, verify, accept.

The answer equals ``model.generate(prompt_ids, do_sample=False, max_new_tokens=N)`` token for token; only the number
of base-model forward passes changes. Cheap draft sources guess the next tokens, the base model scores the last
accepted token plus the whole guess in ONE forward pass over its KV cache, and we keep what it would have chosen
anyway:

    state = prefill(model, prompt)                      # cache = prompt, output = [first greedy token]
    while not done:
        draft  = propose(state, sources, k)             # d_1..d_k, any guess at all (may be empty); which source
                                                        # and k: select_draft + DraftPolicy
        greedy = verify(model, state, draft)            # g_0..g_k: the base model's argmax after each input
        n      = accept(state, draft, greedy)           # keep d_1..d_n, then append g_n; roll the cache back

Acceptance rule (greedy, so exact): draft token d_i is accepted iff d_j == g_{j-1} for every j <= i, where g_j is
the argmax of the base model's logits after input j of ``[last accepted token, d_1, .., d_k]``. The n accepted tokens
are exactly what plain greedy decoding would have produced, and g_n is the base model's own next token, so every step
emits n + 1 >= 1 tokens and no draft, however wrong, can change the output. The cache then holds the prompt and every
output token except the last (which is the input of the next step): the k - n rejected positions are cropped.

Invariant of ``DecodeState``: ``cache`` holds ``prompt + output[:-1]``; ``output[-1]`` is chosen but not yet run.

Exactness is that of the arithmetic: verify computes the logits of k + 1 positions in one pass where generate
computes one per pass, and kernels for different shapes may round differently. That can only flip an argmax whose
top two logits tie to the last bits; fp32 on CPU matched generate everywhere we looked; bf16 on a GPU is the case to
keep checking (benchmarks/bench_decode.py reports identity for every output).

Draft sources are duck-typed (``DraftSource``): ``CopySource`` (n-gram copy from stored answers) and
``ExactAnswerSource`` (a recorded answer to this very prompt) live here; a learned draft (kvdb/draft.py) plugs in
through the same protocol and may ask for hidden states of chosen base-model layers (``wants_features``).
``DraftPolicy`` decides per step which source to ask and for how many tokens, from an explicit cost model.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from kvdb.errors import ModelError, ValidationError
from kvdb.kernels import transposed_rows
from kvdb.lm import LayerTap, new_cache

# ----------------------------------------------------------------------------------------------------------------
# Results and state


@dataclass
class GenerationResult:
    """New tokens only (the eos token included when one ended the answer), and how they were obtained."""

    output_ids: list[int]
    stats: dict[str, Any]


@dataclass
class DecodeState:
    prompt_ids: list[int]
    output: list[int]  # accepted new tokens; output[-1] is not in the cache yet
    cache: Any  # transformers DynamicCache holding prompt + output[:-1]
    device: torch.device
    max_new_tokens: int
    eos_ids: frozenset[int]
    vocab_size: int
    done: bool = False
    features: dict[int, torch.Tensor] | None = None  # layer -> [m, H], rows entered into the cache by the last pass

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.output

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.output)


# ----------------------------------------------------------------------------------------------------------------
# Draft sources


@runtime_checkable
class DraftSource(Protocol):
    """Anything that guesses how the base model continues a context.

    Required: ``name`` and ``propose(context, k)`` (context = prompt + output so far; return at most k token ids,
    [] when it has no guess; a ``Proposal`` may say how good the guess is). Optional attributes, read with getattr:
    - ``cheap: bool``: proposing costs next to nothing (a lookup), so it is asked every step and the policy judges
      the proposal; otherwise (the default, e.g. a learned draft) it is asked only when its expected gain is the best.
    - ``max_draft: int``: the longest draft worth asking for (overrides ``DraftPolicy.max_draft``).
    - ``prior: float``: the per-token acceptance to assume before any evidence (default ``DraftPolicy.prior``).
    - ``token_cost: float``: the time to propose one token, in plain base-model steps (default 0: a lookup). The
      policy adds it to the verify cost, so a draft that is itself slow must be accepted more to be worth asking.
    - ``observe(context, n_accepted)``: called after prefill and after every step that does not end the answer;
      ``n_accepted`` is how many of this source's draft tokens the base model kept in that step, or None when the
      step verified another source's draft or none.
    - ``wants_features: tuple[int, ...]``: 1-based decoder layers whose outputs (before the final norm) the source
      needs. Then ``observe(context, n_accepted, features)`` gets ``{layer: Tensor [m, H]}`` for the m positions
      that entered the KV cache in that forward pass: ``context[-1 - m : -1]`` (after prefill: the whole prompt;
      after a step: the previous last token plus the accepted draft). The last context token is never included: it
      is the base model's own choice and is run by the next pass.
    """

    name: str

    def propose(self, context: list[int], k: int) -> list[int]: ...


class Proposal(list):
    """Draft tokens plus what the source knows of their quality: the policy keeps acceptance statistics per
    (source, ``key``), starting a new key from ``prior`` (e.g. a copy after an 8-token match is likelier right than
    one after a 2-token match)."""

    def __init__(self, tokens=(), key: Any = None, prior: float | None = None):
        super().__init__(tokens)
        self.key = key
        self.prior = prior


# Per-token acceptance of a copy by where it comes from ("seq": a stored sequence, "ctx": the context) and the length
# of the context suffix it matched; the policy adapts from there. Measured on SmolLM2-135M's answers to 24 paraphrased
# and off-topic questions of the default set with retrieved references (acceptance at every answer position, shaded
# down: a copy run counted at each of its positions overstates long matches).
COPY_PRIORS = {"seq": ((8, 0.85), (5, 0.75), (3, 0.55), (2, 0.42), (1, 0.25)),
               "ctx": ((8, 0.85), (5, 0.7), (3, 0.6), (2, 0.5), (1, 0.3))}
# Stored sequences when retrieval found nothing confident: they are about something else (measured 0.30 for 2-token
# matches on off-topic questions, 0.47 for 3, 0.58 for 5).
UNSURE_COPY_PRIORS = {"seq": ((8, 0.7), (5, 0.55), (3, 0.42), (2, 0.28), (1, 0.15)), "ctx": COPY_PRIORS["ctx"]}


class CopySource:
    """Copies from token sequences the answer is likely to repeat (retrieved answers, the model's recorded answers).

    Finds the longest suffix of the context (``max_match`` .. ``min_match`` tokens) that occurs in a sequence and
    proposes what followed it there. An index from each n-gram to its first occurrence makes a proposal a handful
    of dict lookups, independent of how many tokens are stored. With ``search_context`` the context itself (prompt
    and output so far) is searched too, indexed incrementally, latest occurrence first: that is prompt lookup, and
    it catches an answer repeating itself; a stored sequence wins over the context at equal match length.
    Proposals are keyed by where they come from and how long the match was.
    """

    cheap = True

    def __init__(self, sequences: Sequence[Sequence[int]], min_match: int = 2, name: str = "copy",
                 max_match: int = 8, search_context: bool = False,
                 priors: dict[str, Sequence[tuple[int, float]]] | None = None):
        if min_match < 1 or max_match < min_match:
            raise ValidationError(f"CopySource needs 1 <= min_match <= max_match (got {min_match}, {max_match})")
        self.name = name
        self.min_match = min_match
        self.max_match = max_match
        self.search_context = search_context
        self.priors = priors or COPY_PRIORS
        self.sequences: list[list[int]] = [list(s) for s in sequences]
        # (n-gram tokens) -> (sequence index, position just after the n-gram); only n-grams with a continuation.
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}
        for si, seq in enumerate(self.sequences):
            self._add(self.index, seq, range(1, len(seq)), si, first=True)
        self._ctx: list[int] = []  # the context indexed so far (search_context)
        self._ctx_index: dict[tuple[int, ...], tuple[int, int]] = {}

    def _add(self, index: dict, seq: list[int], ends: range, si: int, first: bool) -> None:
        """Index the n-grams of ``seq`` ending just before each position in ``ends`` (which must be < len(seq))."""
        for end in ends:
            for n in range(self.min_match, min(self.max_match, end) + 1):
                key = tuple(seq[end - n:end])
                if first:
                    index.setdefault(key, (si, end))
                else:
                    index[key] = (si, end)

    def _sync(self, context: list[int]) -> None:
        """Extend the context index to ``context`` (which grows by appending; anything else starts over)."""
        known = len(self._ctx)
        if len(context) < known or context[:known] != self._ctx:
            self._ctx, self._ctx_index, known = [], {}, 0
        if len(context) > known:
            self._ctx.extend(context[known:])
            self._add(self._ctx_index, self._ctx, range(max(known, 1), len(self._ctx)), -1, first=False)

    def match(self, context: Sequence[int]) -> tuple[int, int, int] | None:
        """(sequence index, continuation start, matched length) for the longest matching context suffix;
        sequence index -1 means the context itself."""
        for n in range(min(self.max_match, len(context)), self.min_match - 1, -1):
            key = tuple(context[-n:])
            hit = self.index.get(key) or (self._ctx_index.get(key) if self.search_context else None)
            if hit is not None:
                return hit[0], hit[1], n
        return None

    def propose(self, context: list[int], k: int) -> Proposal:
        if k <= 0:
            return Proposal()
        if self.search_context:
            self._sync(context)
        hit = self.match(context)
        if hit is None:
            return Proposal()
        si, start, n = hit
        origin = "seq" if si >= 0 else "ctx"
        bucket, prior = next((b, p) for b, p in self.priors[origin] if n >= b)
        tokens = (self.sequences[si] if si >= 0 else self._ctx)[start:start + k]
        return Proposal(tokens, key=(origin, bucket), prior=prior)


class ExactAnswerSource:
    """A recorded answer of the base model to this exact prompt: proposes its rest while the output still follows it.

    Its drafts are normally all accepted, so it asks for long drafts (``max_draft``) from the first step.
    """

    cheap = True
    prior = 0.999

    def __init__(self, prompt_ids: Sequence[int], answer_ids: Sequence[int], name: str = "exact",
                 max_draft: int = 128):
        self.name = name
        self.prompt_ids = list(prompt_ids)
        self.answer_ids = list(answer_ids)
        self.max_draft = max_draft

    def propose(self, context: list[int], k: int) -> list[int]:
        p = len(self.prompt_ids)
        if k <= 0 or len(context) < p or context[:p] != self.prompt_ids:
            return []
        done = len(context) - p
        if done >= len(self.answer_ids) or context[p:] != self.answer_ids[:done]:
            return []
        return self.answer_ids[done:done + k]


# ----------------------------------------------------------------------------------------------------------------
# Policy: which source, how many tokens


def expected_tokens(p: float, k: int) -> float:
    """Tokens one step emits with a k-token draft whose tokens are each right with probability p (geometric):
    1 + p + p^2 + .. + p^k (the base model's own token is always emitted)."""
    if p >= 1.0:
        return k + 1.0
    return (1.0 - p ** (k + 1)) / (1.0 - p)


@dataclass
class _Track:
    """Acceptance evidence for one (source, proposal key), or for a costly source as a whole ("*")."""

    prior_hits: float  # the prior, as pseudo-counts
    prior_misses: float
    max_k: int  # current cap on the draft length: grows on full acceptance, shrinks on rejection
    hits: float = 0.0  # accepted draft tokens (decayed, on top of the prior)
    misses: float = 0.0  # rejections, i.e. drafts not accepted in full (decayed, on top of the prior)
    seen_at: int = 0  # step up to which the decay has been applied
    misfires: int = 0  # consecutive drafts with nothing accepted
    naps: int = 0  # consecutive back-offs without a success in between
    wake_at: int = 0  # step from which drafts are verified again

    def refresh(self, step: int, decay: float) -> None:
        """Old evidence fades by ``decay`` per step, so an estimate left alone drifts back to the prior."""
        if step > self.seen_at:
            fade = decay ** (step - self.seen_at)
            self.hits *= fade
            self.misses *= fade
            self.seen_at = step

    @property
    def p(self) -> float:
        return (self.prior_hits + self.hits) / (self.prior_hits + self.prior_misses + self.hits + self.misses)


@dataclass
class DraftPolicy:
    """Chooses per step the draft to verify and its length, from the acceptance seen so far.

    Cost model, in plain single-token steps. With ``pass_costs`` (measured on this machine by
    ``measure_pass_costs``: the time of a pass over q tokens relative to one token, for q = 1, 2, ..), a verify
    pass over 1 + k tokens costs the cheapest measured pass over at least 1 + k tokens, and ``pass_length`` says how
    long that pass is: kernels are not monotone in q (SmolLM2 fp32 on CPU: q=2 costs 1.66 steps, q=3 2.1, but q=4
    only 1.45), so a short draft is padded to the cheap length, which cannot change the outputs of the positions
    before the padding. Without a table: ``1 + draft_overhead + token_cost * k`` (k >= 1). Making a draft adds its
    source's ``token_cost`` per token. A draft whose tokens are each accepted with
    probability p then yields ``gain = expected_tokens(p, k) * cost(0) / cost(k)`` against 1 for a step without a
    draft, and we verify the k that maximises it, or nothing when no gain reaches ``min_gain``. ``cost(0)`` is the
    cheapest pass that verifies one token: 1 (greedy decoding's own step) unless the table finds a 2-input pass
    faster, as it can with the transposed kernel (``PassPlan``); then plain steps are padded too.

    Which source: cheap sources (lookups) are asked every step; each proposal is judged with the acceptance estimate
    of its (source, key) and cut to its best k. A costly source (a learned draft) is asked only when the gain its own
    record promises beats the best cheap proposal. The best gain is verified.

    The table is measured once, at one context length, on a machine that may be busy; verify passes after a long
    prompt cost more (SmolLM2 on CPU: passes of 2-10 tokens averaged 1.4-1.6 steps at 256 tokens, 1.8-1.9 at
    700). So the driver times every pass of this answer (``observe_pass``) and the extra cost of a pass over a plain step is
    scaled by what was seen: ``cost(q) = 1 + (table(q) - 1) * s``, s = (W + sum of observed extra) / (W + sum of the
    table's extra) over the passes seen, W = ``cost_prior_weight`` (the table's weight, in plain steps of extra
    cost), once ``cost_min_plain`` plain steps give the unit.

    Estimates: p is the share of accepted tokens among accepted tokens and rejections, counted on top of the
    proposal's prior (``prior_weight`` pseudo-counts); evidence fades by ``decay`` per step, so a source that fell
    below the bar is tried again once its bad record has faded. Full acceptance also doubles the length cap
    (``growth``), a rejection halves it. A (source, key) whose drafts are rejected outright ``patience`` times in a
    row sleeps for ``retry_after`` steps, then is probed with at most ``probe_k`` tokens; each failed probe doubles
    the sleep (up to ``max_sleep``); one success resets that. Always-wrong drafts thus cost four short drafts per
    hundred tokens (~2% on CPU); a source with nothing to propose costs nothing.
    """

    max_draft: int = 16
    token_cost: float | None = None  # None: 1/24 on CPU, 1/256 on accelerators
    draft_overhead: float | None = None  # None: 0.5 on CPU, 0.05 on accelerators
    prior: float = 0.6
    prior_weight: float = 2.0
    decay: float = 0.85
    growth: int = 2
    patience: int = 1
    retry_after: int = 8
    max_sleep: int = 64
    probe_k: int = 2  # length cap when retrying after a back-off
    pass_costs: Sequence[float] | None = None  # measured: cost of a pass over q tokens / 1 token, q = 1, 2, ..
    transposed_rows: frozenset[int] = frozenset()  # pass lengths run as (W @ x^T)^T (PassPlan, kvdb.kernels)
    # A draft must promise this much over a plain step: estimates of p and of pass costs are rough, and a marginal
    # draft that fails costs a whole padded pass (off-topic questions ran at 0.88x with 1.0).
    min_gain: float = 1.1
    source_weight: float = 0.5  # share of a source's record a new key of it starts with
    source_decay: float = 0.95
    cost_prior_weight: float = 1.5
    cost_min_plain: int = 2
    step: int = field(default=0, init=False, repr=False)
    _plain: list[float] = field(default_factory=list, init=False, repr=False)  # seconds of plain steps
    _passes: list[tuple[int, float]] = field(default_factory=list, init=False, repr=False)  # (q, seconds), q > 1
    _scale: float = field(default=1.0, init=False, repr=False)
    _by_source: dict[int, tuple[float, float, int]] = field(default_factory=dict, init=False, repr=False)
    _tracks: dict[tuple[int, Any], _Track] = field(default_factory=dict, init=False, repr=False)
    _per_token: float = field(default=1 / 24, init=False, repr=False)
    _overhead: float = field(default=0.5, init=False, repr=False)
    _sources: list[DraftSource] = field(default_factory=list, init=False, repr=False)

    # -- set-up and the cost model --

    def start(self, sources: Sequence[DraftSource], device: torch.device) -> None:
        """Reset for one generation."""
        cpu = device.type == "cpu"
        self._per_token = self.token_cost if self.token_cost is not None else (1 / 24 if cpu else 1 / 256)
        self._overhead = self.draft_overhead if self.draft_overhead is not None else (0.5 if cpu else 0.05)
        self.step = 0
        self._tracks = {}
        self._by_source = {}
        self._sources = list(sources)
        self._plain, self._passes, self._scale = [], [], 1.0

    def observe_pass(self, q: int, seconds: float) -> None:
        """Record the wall time of one verify pass over ``q`` inputs (1: a plain step) of this answer."""
        if q <= 1:
            self._plain.append(seconds)
        else:
            self._passes.append((q, seconds))
        if len(self._plain) < self.cost_min_plain or not self._passes:
            return
        unit = statistics.median(self._plain[-16:])
        seen = sum(max(0.0, t / unit - 1.0) for _, t in self._passes[-16:])
        table = sum(self._table(q) - 1.0 for q, _ in self._passes[-16:])
        w = self.cost_prior_weight
        self._scale = min(4.0, max(0.25, (w + seen) / (w + max(0.0, table))))

    def _table(self, q: int) -> float:
        """The table's cost of a pass over exactly q inputs (linear beyond it, or without one)."""
        costs = self.pass_costs
        if costs and q <= len(costs):
            return float(costs[q - 1])
        return self._pass_uncorrected(q)[0]

    def _pass(self, q: int) -> tuple[float, int]:
        """(cost, length) of the cheapest pass that verifies q tokens (padding allowed), in plain steps, with the
        extra over a plain step scaled by what this answer's passes cost (``observe_pass``)."""
        cost, length = self._pass_uncorrected(q)
        return (1.0 + (cost - 1.0) * self._scale if length > 1 and cost > 1.0 else cost), length

    def _pass_uncorrected(self, q: int) -> tuple[float, int]:
        costs = self.pass_costs
        if not costs or q > len(costs):
            linear = 1.0 + ((self._overhead + self._per_token * (q - 1)) if q > 1 else 0.0)
            if costs and len(costs) >= 2:
                # Beyond the table: extend the slope of its upper half. The last two entries alone are too noisy
                # (one table's 0.19 steps per token priced a 118-token replay at 20 steps, where a pass that long
                # costs ~4, and cut stored answers into 24-token passes: 5.4x instead of ~10x).
                mid = (len(costs) - 1) // 2
                last, slope = costs[-1], max(0.0, (costs[-1] - costs[mid]) / (len(costs) - 1 - mid))
                linear = max(last, last + slope * (q - len(costs)))
            return linear, q
        best = min(range(q - 1, len(costs)), key=lambda i: (costs[i], i))
        return float(costs[best]), best + 1

    def pass_length(self, k: int) -> int:
        """How many inputs the verify pass of a k-token draft should have (1 + k, or more where that is cheaper)."""
        return self._pass(k + 1)[1]

    def cost(self, k: int, draft_cost: float = 0.0) -> float:
        """Time of drafting k tokens (``draft_cost`` each) and a verify pass over 1 + k tokens, in plain one-token
        steps. A step without a draft costs the cheapest pass (it is padded where a longer pass is faster)."""
        return self._pass(k + 1)[0] + draft_cost * k

    def gain(self, p: float, k: int, draft_cost: float = 0.0) -> float:
        """Expected tokens per unit of time for a k-token draft accepted per token with p, relative to a step
        without one (1.0)."""
        return expected_tokens(p, k) * self.cost(0) / self.cost(k, draft_cost)

    def best_k(self, p: float, cap: int, draft_cost: float = 0.0) -> tuple[int, float]:
        """(k, gain) maximising the gain for 1 <= k <= cap; (0, 1.0) when no draft beats a plain step by
        ``min_gain``."""
        best_k, best = 0, 1.0
        for k in range(1, cap + 1):
            g = self.gain(p, k, draft_cost)
            if g > best:
                best_k, best = k, g
        return (best_k, best) if best >= self.min_gain else (0, 1.0)

    def _draft_cost(self, index: int) -> float:
        return float(getattr(self._sources[index], "token_cost", 0.0) or 0.0)

    def _cap(self, index: int) -> int:
        return int(getattr(self._sources[index], "max_draft", None) or self.max_draft)

    def _track(self, index: int, key: Any, prior: float | None = None) -> _Track:
        track = self._tracks.get((index, key))
        if track is None:
            if prior is None:
                prior = float(getattr(self._sources[index], "prior", self.prior))
            # A new key of a source inherits part of what that source's other keys showed in this answer: copies
            # that keep failing on an off-topic question make every further kind of copy suspect too.
            hits, misses = self._source_record(index)
            track = _Track(prior * self.prior_weight + self.source_weight * hits,
                           (1 - prior) * self.prior_weight + self.source_weight * misses, self._cap(index),
                           seen_at=self.step)
            self._tracks[index, key] = track
        track.refresh(self.step, self.decay)
        return track

    # -- per step --

    def ask(self, remaining: int) -> list[tuple[int, int]]:
        """Sources to ask this step as (source index, most tokens to ask for); [] means a plain step.

        Cheap sources first (always asked), then costly ones best expected gain first, with that gain."""
        limit = remaining - 1  # a fully accepted k-draft emits k + 1 tokens: never draft past max_new_tokens
        if limit <= 0:
            return []
        cheap, costly = [], []
        for i, source in enumerate(self._sources):
            if getattr(source, "cheap", False):
                cheap.append((i, min(self._cap(i), limit)))
                continue
            track = self._track(i, "*")
            if track.wake_at > self.step:
                continue
            k, g = self.best_k(track.p, min(track.max_k, limit), self._draft_cost(i))
            if k:
                costly.append((g, i, k))
        costly.sort(key=lambda o: -o[0])
        return cheap + [(i, k) for _, i, k in costly]

    def promise(self, index: int) -> float:
        """The gain a costly source's record promises before it is asked (0 when it is sleeping)."""
        track = self._track(index, "*")
        return 0.0 if track.wake_at > self.step else self.best_k(track.p, track.max_k, self._draft_cost(index))[1]

    def judge(self, index: int, draft: list[int]) -> tuple[int, float]:
        """(tokens of ``draft`` worth verifying, expected gain) from the record of its (source, key)."""
        key, prior = getattr(draft, "key", None), getattr(draft, "prior", None)
        track = self._track(index, key, prior)
        if track.wake_at > self.step:
            return 0, 1.0
        # The draft is already made: only the verify cost is still to pay.
        return self.best_k(track.p, min(track.max_k, len(draft)))

    def _source_record(self, index: int) -> tuple[float, float]:
        """(accepted tokens, rejections) of source ``index`` over all its keys in this answer, fading slowly."""
        hits, misses, at = self._by_source.get(index, (0.0, 0.0, self.step))
        fade = self.source_decay ** (self.step - at)
        return hits * fade, misses * fade

    def update(self, index: int | None, draft: list[int], accepted: int) -> None:
        """Record one step: source ``index`` (None: plain step) drafted ``draft``, ``accepted`` tokens were kept."""
        self.step += 1
        if index is None or not draft:
            return
        key, prior = getattr(draft, "key", None), getattr(draft, "prior", None)
        self._record(index, self._track(index, key, prior), len(draft), accepted)
        hits, misses = self._source_record(index)
        self._by_source[index] = (hits + accepted, misses + (1.0 if accepted < len(draft) else 0.0), self.step)
        if (index, "*") in self._tracks and key != "*":
            self._record(index, self._track(index, "*"), len(draft), accepted)

    def _record(self, index: int, t: _Track, drafted: int, accepted: int) -> None:
        t.hits += accepted
        t.misses += 1.0 if accepted < drafted else 0.0
        if accepted == drafted:
            t.max_k = min(self._cap(index), max(t.max_k, drafted * self.growth))
        else:
            t.max_k = max(1, min(t.max_k, max(accepted + 1, t.max_k // 2)))
        if accepted:
            t.misfires = t.naps = 0
            return
        t.misfires += 1
        # Back off: plain steps for a while, then one short probe from the prior; a failed probe sleeps twice as long.
        if t.misfires >= (self.patience if t.naps == 0 else 1):
            t.wake_at = self.step + min(self.max_sleep, self.retry_after * 2 ** t.naps)
            t.naps += 1
            t.misfires = 0
            t.hits = t.misses = 0.0
            t.max_k = min(t.max_k, self.probe_k)


# ----------------------------------------------------------------------------------------------------------------
# The phases


def prefill(model, prompt_ids: list[int], max_new_tokens: int = 1, eos_ids: Sequence[int] = (),
            tap: LayerTap | None = None) -> DecodeState:
    """Run the prompt through the model into a fresh cache; the first new token is the argmax of the last logits."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
    cache = new_cache(model)
    only_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, cache=cache, use_cache=True, **only_last)  # logits [1, 1 or T, V]
    first = out.logits[0, -1].argmax(-1).item()
    state = DecodeState(list(prompt_ids), [first], cache, device, max_new_tokens, frozenset(eos_ids),
                        model.get_output_embeddings().weight.shape[0])
    state.done = first in state.eos_ids or max_new_tokens <= 1
    if tap is not None:
        state.features = tap.rows(len(prompt_ids))  # layer -> [T, H]
    return state


def propose(state: DecodeState, sources: Sequence[DraftSource], k: int) -> Proposal:
    """The first non-empty draft of at most k tokens continuing prompt + output, asking ``sources`` in order.

    Token ids outside the vocabulary end the draft (a draft may be wrong, never invalid)."""
    if k <= 0:
        return Proposal()
    context = state.context
    for source in sources:
        raw = source.propose(context, k)
        draft = [int(t) for t in raw[:k]]
        for i, tok in enumerate(draft):
            if not 0 <= tok < state.vocab_size:
                draft = draft[:i]
                break
        if draft:
            return Proposal(draft, getattr(raw, "key", None), getattr(raw, "prior", None))
    return Proposal()


def select_draft(state: DecodeState, sources: Sequence[DraftSource],
                 policy: DraftPolicy) -> tuple[int | None, Proposal]:
    """(source index, draft) with the best expected gain this step, or (None, []) for a plain step."""
    best_gain, best_index, best = 1.0, None, Proposal()
    for i, k in policy.ask(state.remaining):
        if not getattr(sources[i], "cheap", False) and policy.promise(i) <= best_gain:
            continue  # a costly source is asked only when its record beats the best draft in hand
        draft = propose(state, [sources[i]], k)
        if not draft:
            continue
        n, gain = policy.judge(i, draft)
        if n and gain > best_gain:
            best_gain, best_index, best = gain, i, Proposal(draft[:n], draft.key, draft.prior)
    return best_index, best


def verify(model, state: DecodeState, draft: list[int], tap: LayerTap | None = None, pad: int = 0) -> list[int]:
    """ONE forward pass over [last accepted token] + draft on the cache; the base model's argmax after each input.

    ``pad`` extra inputs make the pass longer where a longer pass is faster (DraftPolicy.pass_length); causal
    attention keeps them out of every earlier position, and they leave the cache at once.
    Returns g_0..g_k (k = len(draft)); the cache grows by k + 1 positions (``accept`` crops the rejected ones)."""
    last = state.output[-1]
    ids = torch.tensor([[last, *draft, *[last] * pad]], dtype=torch.long, device=state.device)  # [1, k+1+pad]
    out = model(input_ids=ids, cache=state.cache, use_cache=True)  # logits [1, k+1+pad, V]
    if pad:
        state.cache.crop(-pad)
    greedy = out.logits[0, : len(draft) + 1].argmax(-1).tolist()  # [k+1]; one device->host copy per step
    if tap is not None:
        state.features = tap.rows(len(draft) + 1)  # layer -> [k+1, H]; accept() keeps the accepted rows
    return greedy


def accept(state: DecodeState, draft: list[int], greedy: list[int]) -> int:
    """Keep the longest prefix of ``draft`` equal to the base model's greedy tokens, then its own next token.

    d_i is kept iff d_j == g_{j-1} for all j <= i; the step emits d_1..d_n, g_n. Like greedy generate, the output
    stops right after an eos token and never exceeds max_new_tokens. The cache is cropped to prompt + output[:-1].
    Returns n, the number of draft tokens emitted."""
    n = 0
    while n < len(draft) and draft[n] == greedy[n]:
        n += 1
    new = draft[:n] + [greedy[n]]
    if state.remaining <= len(new):
        new = new[:state.remaining]
        state.done = True
    for i, tok in enumerate(new):
        if tok in state.eos_ids:
            new = new[:i + 1]
            state.done = True
            break
    state.output.extend(new)
    # verify ran k + 1 inputs; the last accepted token and the n accepted draft tokens stay, the rest go.
    state.cache.crop(-(len(draft) - n))
    if state.features is not None:
        state.features = {layer: rows[:n + 1] for layer, rows in state.features.items()}  # [n+1, H]
    return min(n, len(new))


# ----------------------------------------------------------------------------------------------------------------
# Measuring the cost model


@dataclass(frozen=True)
class PassPlan:
    """This machine's verify passes: ``costs[q - 1]`` is the time of a pass over q tokens relative to a plain
    one-token step (DraftPolicy.pass_costs), with the faster kernel for that length; ``transposed_rows`` are the
    lengths computed as ``(W @ x^T)^T`` (kvdb.kernels), which won there."""

    costs: list[float]
    transposed_rows: frozenset[int] = frozenset()


@torch.inference_mode()
def measure_pass_plan(model, max_q: int = 33, context: int = 256, reps: int = 5,
                      try_transposed: bool = True) -> PassPlan:
    """Time one cached forward pass over q = 1..max_q new tokens after ``context`` tokens, with ``F.linear`` and
    (``try_transposed``) with the transposed product, relative to the one-token ``F.linear`` pass that plain greedy
    decoding runs. ``reps`` rounds over every q and kernel, the median per (q, kernel): interleaving spreads other
    work on the machine over all of them alike, and the median does not reward one lucky run (a fastest-of-3 table
    once made a 5-token pass look 10% cheaper than it is, and weak drafts worth verifying). The transposed kernel is
    swept only where a probe of 2, 4 and 8 inputs finds it 10% faster somewhere, and a length takes it only where it
    wins by 3%: near equal, the stock kernel is the one generate's own passes share."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context), generator=gen).to(device)  # [1, C]
    probe = torch.randint(0, vocab, (1, max_q), generator=gen).to(device)  # [1, max_q]
    cache = new_cache(model)
    model(input_ids=prompt, cache=cache, use_cache=True)

    def once(q: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = model(input_ids=probe[:, :q], cache=cache, use_cache=True)
        out.logits[0].argmax(-1).tolist()  # as verify does: the host waits for the result
        seconds = time.perf_counter() - t0
        cache.crop(-q)
        return seconds

    lengths = range(1, max_q + 1)
    if try_transposed and max_q >= 2:
        # A short probe first: where the stock kernel is as fast (this is common), the full sweep of the second
        # kernel would double the measurement for nothing.
        few = sorted({q for q in (2, 4, 8) if q <= max_q})
        with transposed_rows(model, few):
            for q in few:  # warm-up
                once(q)
            probe_alt = [min(once(q) for _ in range(2)) for q in few]
        probe_stock = [min(once(q) for _ in range(2)) for q in few]
        try_transposed = any(a < 0.9 * s for a, s in zip(probe_alt, probe_stock))
    transposed = range(2, max_q + 1) if try_transposed else range(0)
    stock_runs: list[list[float]] = []
    transposed_runs: list[list[float]] = []
    for rep in range(reps + 1):  # round 0 warms both kernels up
        stock = [once(q) for q in lengths]
        with transposed_rows(model, transposed):
            other = [once(q) for q in transposed]
        if rep:
            stock_runs.append(stock)
            transposed_runs.append(other)
    stock_t = [statistics.median(times) for times in zip(*stock_runs)]
    other_t = [statistics.median(times) for times in zip(*transposed_runs)] if transposed else []
    unit = stock_t[0]
    costs, chosen = [1.0], set()
    for q in lengths[1:]:
        t = stock_t[q - 1]
        if other_t and other_t[q - 2] < 0.97 * t:
            t = other_t[q - 2]
            chosen.add(q)
        costs.append(round(t / unit, 4))
    return PassPlan(costs, frozenset(chosen))


def measure_pass_costs(model, max_q: int = 33, context: int = 256, reps: int = 5) -> list[float]:
    """``measure_pass_plan`` with ``F.linear`` only: the pass costs of the stock kernels."""
    return measure_pass_plan(model, max_q, context, reps, try_transposed=False).costs


# ----------------------------------------------------------------------------------------------------------------
# Drivers


# Generation-config settings that make HF greedy decoding differ from a plain argmax (we refuse rather than differ).
_ARGMAX_CHANGERS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
                    "min_new_tokens": 0, "bad_words_ids": None, "suppress_tokens": None,
                    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                    "sequence_bias": None, "exponential_decay_length_penalty": None}


def _check_plain_greedy(model, prompt_len: int) -> None:
    config = getattr(model, "generation_config", None)
    if config is None:
        return
    changers = [(name, getattr(config, name, neutral), neutral) for name, neutral in _ARGMAX_CHANGERS.items()]
    changers.append(("min_length", getattr(config, "min_length", 0), 0))
    for name, value, neutral in changers:
        if name == "min_length" and (value or 0) <= prompt_len:
            continue  # only suppresses eos while the sequence is shorter than min_length
        if value not in (neutral, None):
            raise ModelError(f"the model's generation config sets {name}={value!r}, so its greedy output is not a "
                             "plain argmax and speculative decoding could not match it; remove it from "
                             "generation_config.json")


def _validate(prompt_ids: list[int], max_new_tokens: int) -> None:
    if not prompt_ids:
        raise ValidationError("the prompt is empty: give at least one token id")
    if max_new_tokens < 1:
        raise ValidationError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")


def _emit(state: DecodeState, before: int, on_tokens: Callable[[list[int]], None] | None) -> None:
    if on_tokens is not None and len(state.output) > before:
        on_tokens(state.output[before:])


@torch.inference_mode()
def speculative_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: Sequence[int],
                         sources: Sequence[DraftSource] = (), policy: DraftPolicy | None = None,
                         on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
    """Greedy decoding of ``model`` after ``prompt_ids``, accelerated by draft ``sources``; output identical to
    ``model.generate(do_sample=False, max_new_tokens=max_new_tokens)`` (new tokens only, eos included)."""
    _validate(prompt_ids, max_new_tokens)
    _check_plain_greedy(model, len(prompt_ids))
    sources = list(sources)
    policy = policy or DraftPolicy()
    layers = sorted({layer for s in sources for layer in getattr(s, "wants_features", ()) or ()})
    feature_sources = {i for i, s in enumerate(sources) if getattr(s, "wants_features", ())}
    observers = [(i, s.observe) for i, s in enumerate(sources) if callable(getattr(s, "observe", None))]
    per_source = {s.name: {"proposals": 0, "drafted": 0, "accepted": 0} for s in sources}
    tap = LayerTap(model, layers) if layers else None  # no hooks at all when nobody asks for features
    max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    steps = drafted_total = accepted_total = 0
    try:
        with transposed_rows(model, policy.transposed_rows):  # the kernels measured fastest per pass length
            t0 = time.perf_counter()
            state = prefill(model, prompt_ids, max_new_tokens, eos_ids, tap)
            ttft = time.perf_counter() - t0
            _emit(state, 0, on_tokens)
            policy.start(sources, state.device)
            used, n = None, 0
            while True:
                if observers and not state.done:
                    context = state.context
                    for i, observe in observers:
                        mine = n if i == used else None
                        if i in feature_sources:
                            observe(context, mine, state.features)
                        else:
                            observe(context, mine)
                if state.done:
                    break
                used, draft = select_draft(state, sources, policy)
                # Padding never runs past the model's positions (the cache holds prompt + output[:-1]).
                room = max_positions - (len(state.prompt_ids) + len(state.output) - 1) - (len(draft) + 1)
                pad = max(0, min(policy.pass_length(len(draft)) - 1 - len(draft), room))
                t_pass = time.perf_counter()
                greedy = verify(model, state, draft, tap, pad=pad)  # returns host ints: the pass has finished
                policy.observe_pass(len(draft) + 1 + pad, time.perf_counter() - t_pass)
                before = len(state.output)
                n = accept(state, draft, greedy)
                policy.update(used, draft, n)
                steps += 1
                if used is not None:
                    counts = per_source[sources[used].name]
                    counts["proposals"] += 1
                    counts["drafted"] += len(draft)
                    counts["accepted"] += n
                    drafted_total += len(draft)
                    accepted_total += n
                _emit(state, before, on_tokens)
            seconds = time.perf_counter() - t0
    finally:
        if tap is not None:
            tap.close()
    return GenerationResult(list(state.output), _stats(seconds, ttft, len(state.output), steps, drafted_total,
                                                       accepted_total, per_source))


def _stats(seconds: float, ttft: float, new_tokens: int, steps: int, drafted: int, accepted: int,
           per_source: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {"seconds": round(seconds, 6), "new_tokens": new_tokens, "verify_steps": steps, "drafted": drafted,
            "accepted": accepted, "time_to_first_token": round(ttft, 6),
            "tokens_per_second": round(new_tokens / seconds, 3) if seconds > 0 else 0.0,
            "accepted_per_step": round(accepted / steps, 3) if steps else 0.0, "sources": per_source}


class _FirstTokenClock:
    """A generate() streamer that only notes when the first new token arrives (its first put is the prompt)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.puts = 0
        self.first_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first_at = time.perf_counter()

    def end(self) -> None:
        pass


@torch.inference_mode()
def draft_only_generate(source: DraftSource, prompt_ids: list[int], max_new_tokens: int, eos_ids: Sequence[int],
                        chunk: int = 16, on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
    """The draft source's own continuation, never verified (`kvdb query --draft-only`): what it would propose if
    every token were accepted. Fast and approximate; not the base model's answer."""
    _validate(prompt_ids, max_new_tokens)
    eos = frozenset(eos_ids)
    output: list[int] = []
    steps = 0
    t0 = time.perf_counter()
    ttft = None
    while len(output) < max_new_tokens:
        tokens = [int(t) for t in source.propose(list(prompt_ids) + output, min(chunk, max_new_tokens - len(output)))]
        steps += 1
        if not tokens:
            break
        for i, tok in enumerate(tokens):
            if tok in eos:
                tokens = tokens[:i + 1]
                break
        if ttft is None:
            ttft = time.perf_counter() - t0
        output += tokens
        if on_tokens is not None:
            on_tokens(tokens)
        if tokens[-1] in eos:
            break
    seconds = time.perf_counter() - t0
    stats = _stats(seconds, ttft or seconds, len(output), 0, len(output), 0, {})
    stats["draft_calls"] = steps
    return GenerationResult(output, stats)


@torch.inference_mode()
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: Sequence[int],
                    **generate_kwargs: Any) -> GenerationResult:
    """The baseline: plain ``model.generate(do_sample=False)``, no drafts; same result type and stats keys.

    ``generate_kwargs`` pass Hugging Face's own greedy accelerations for comparison (``prompt_lookup_num_tokens``,
    ``assistant_early_exit``); their draft counts are not visible from outside, so those stats stay 0."""
    _validate(prompt_ids, max_new_tokens)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
    eos = list(eos_ids) or None
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    clock = _FirstTokenClock(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=pad, streamer=clock, **generate_kwargs)  # [1, T + new]
    new = out[0, len(prompt_ids):].tolist()
    seconds = time.perf_counter() - t0
    ttft = (clock.first_at - t0) if clock.first_at is not None else seconds
    steps = 0 if generate_kwargs else max(len(new) - 1, 0)  # plain greedy: one pass per token after the prefill
    return GenerationResult(new, _stats(seconds, ttft, len(new), steps, 0, 0, {}))


__all__ = ["COPY_PRIORS", "UNSURE_COPY_PRIORS", "CopySource", "DecodeState", "DraftPolicy", "DraftSource", "ExactAnswerSource",
           "GenerationResult", "Proposal", "accept", "draft_only_generate", "expected_tokens", "greedy_generate",
           "PassPlan", "measure_pass_costs", "measure_pass_plan", "prefill", "propose",
           "select_draft", "speculative_generate", "verify"]
