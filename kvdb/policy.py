"""The draft policy: per step, which source's draft to verify and how many of its tokens (kvdb.decode asks it).

Two halves: acceptance tracking (how often each source's drafts are kept, per kind of proposal, fading with time)
and the pass-cost model (what a verify pass over q tokens costs against a plain one-token step, from the table
kvdb.passcost measures, corrected by the passes of the current answer). A draft is verified when its expected tokens
per unit of time beat a plain step.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvdb.sources import DraftSource


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
    ``kvdb.passcost.measure_pass_plan``: the time of a pass over q tokens relative to one token, for q = 1, 2, ..),
    a verify pass over 1 + k tokens costs the cheapest measured pass over at least 1 + k tokens, and
    ``pass_length`` says how long that pass is: kernels are not monotone in q (a 4-token pass can be cheaper than a
    3-token one), so a short draft is padded to the cheap length, which cannot change the outputs of the positions
    before the padding. Without a table: ``1 + draft_overhead + token_cost * k`` (k >= 1). Making a draft adds its
    source's ``token_cost`` per token. A draft whose tokens are each accepted with
    probability p then yields ``gain = expected_tokens(p, k) * cost(0) / cost(k)`` against 1 for a step without a
    draft, and we verify the k that maximises it, or nothing when no gain reaches ``min_gain``. ``cost(0)`` is the
    cheapest pass that verifies one token: 1 (greedy decoding's own step) unless the table finds a 2-input pass
    faster, as it can with the transposed kernel (kvdb.passcost.PassPlan); then plain steps are padded too.

    Which source: cheap sources (lookups) are asked every step; each proposal is judged with the acceptance estimate
    of its (source, key) and cut to its best k. A costly source (a learned draft) is asked only when the gain its own
    record promises beats the best cheap proposal. The best gain is verified.

    The table is measured once, at one context length, on a machine that may be busy, and verify passes after a
    long prompt cost more. So the loop times every pass of this answer (``observe_pass``) and the extra cost of a
    pass over a plain step is scaled by what was seen: ``cost(q) = 1 + (table(q) - 1) * s``, s = (W + sum of
    observed extra) / (W + sum of the table's extra) over the passes seen, W = ``cost_prior_weight`` (the table's
    weight, in plain steps of extra cost), once ``cost_min_plain`` plain steps give the unit.

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
    # A draft must promise this much over a plain step: estimates of p and of pass costs are rough, and a marginal
    # draft that fails costs a whole padded pass.
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

    def start(self, sources: Sequence[DraftSource], device: Any = "cpu") -> None:
        """Reset for one generation on ``device`` (a torch.device or its type name; sets the default draft costs)."""
        cpu = str(getattr(device, "type", device)) == "cpu"
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
                # Beyond the table: extend the slope of its upper half; the last two entries alone are too noisy
                # and would overprice the long passes that replay a recorded answer.
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


__all__ = ["DraftPolicy", "expected_tokens"]
