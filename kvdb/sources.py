"""Draft sources: cheap guesses at how the base model continues a context, for the decoding loop (kvdb.decode).

A source only proposes; the loop verifies every proposal with the base model, so a wrong guess costs time, never
correctness. Here: the protocol, ``CopySource`` (n-gram copies from stored answers and from the context itself) and
``ExactAnswerSource`` (a recorded answer to this very prompt). The learned draft (kvdb.draft.LearnedDraftSource)
implements the same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from kvdb.errors import ValidationError


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
      is the base model's own choice and is run by the next pass. On an engine that cannot tap its layers (no
      ``tap``, kvdb.engines.base) such a source is skipped with a notice.
    A source that raises, in ``propose`` or ``observe``, is reported in the answer's notices and not asked again
    for that answer: the steps it would have drafted are plain steps.
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


# Per-token acceptance of a copy by where it comes from ("seq": a stored sequence, "ctx": the context) and by
# (at least) how many context tokens it matched: longer matches are likelier right. Starting points only (the
# acceptance of SmolLM2-135M's answers to the default set's paraphrased and off-topic questions, shaded down); the
# policy adapts from there within each answer.
COPY_PRIORS = {"seq": ((8, 0.85), (5, 0.75), (3, 0.55), (2, 0.42), (1, 0.25)),
               "ctx": ((8, 0.85), (5, 0.7), (3, 0.6), (2, 0.5), (1, 0.3))}
# Stored sequences when retrieval found nothing confident are about something else: lower priors.
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


__all__ = ["COPY_PRIORS", "UNSURE_COPY_PRIORS", "CopySource", "DraftSource", "ExactAnswerSource", "Proposal"]
