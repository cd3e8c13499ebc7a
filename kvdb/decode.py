"""Lossless speculative decoding in named phases: prefill, propose, verify, accept.

The answer equals the engine's own plain greedy decoding token for token (for the transformers engine:
``model.generate(prompt_ids, do_sample=False, max_new_tokens=N)``); only the number of base-model passes changes.
Cheap draft sources (kvdb.sources) guess the next tokens, the engine scores the last accepted token plus the whole
guess in ONE pass over its KV cache, and we keep what it would have chosen anyway:

    state = prefill(engine, prompt)                     # context = prompt, output = [first greedy token]
    while not done:
        draft  = select_draft(state, sources, policy)   # d_1..d_k = propose(state, source, k), any guess at all
                                                        # (may be empty); DraftPolicy (kvdb.policy) picks source, k
        greedy = verify(engine, state, draft)           # g_0..g_k: the engine's argmax after each input
        n      = accept(engine, state, draft, greedy)   # keep d_1..d_n, then append g_n; roll the rest back

Acceptance rule (greedy, so exact): draft token d_i is accepted iff d_j == g_{j-1} for every j <= i, where g_j is
the argmax of the base model's logits after input j of ``[last accepted token, d_1, .., d_k]``. The n accepted
tokens are exactly what plain greedy decoding would have produced, and g_n is the base model's own next token, so
every step emits n + 1 >= 1 tokens and no draft, however wrong (or failing), can change the output.

Exactness is that of the arithmetic: verify computes the logits of k + 1 positions in one pass where greedy decoding
computes one per pass, and kernels for different shapes may round differently. That can only flip an argmax whose
top two logits tie to the last bits (benchmarks/bench_decode.py reports identity for every output).

The engine (kvdb.engines) is the only thing that touches the base model: prefill, verify k tokens, roll back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvdb.engines import Engine, as_engine
from kvdb.engines.statecache import PrefixReuse
from kvdb.errors import ValidationError
from kvdb.policy import DraftPolicy
from kvdb.sources import DraftSource, Proposal

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Results and state


@dataclass
class GenerationResult:
    """New tokens only (the eos token included when one ended the answer), and how they were obtained."""

    output_ids: list[int]
    stats: dict[str, Any]


@dataclass
class DecodeState:
    """One answer in progress.

    Invariant between steps: the engine's context holds ``prompt_ids + output[:-1]``; ``output[-1]`` is chosen
    but not yet run (it is the first input of the next verify pass)."""

    prompt_ids: list[int]
    output: list[int]  # accepted new tokens
    max_new_tokens: int
    eos_ids: frozenset[int]
    vocab_size: int
    done: bool = False
    broken: set[int] = field(default_factory=set)  # sources that raised: not asked again in this answer
    notices: list[str] = field(default_factory=list)

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.output

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.output)

    def notice(self, message: str) -> None:
        log.warning(message)
        self.notices.append(message)


# ----------------------------------------------------------------------------------------------------------------
# The phases


def prefill(engine: Engine, prompt_ids: list[int], max_new_tokens: int = 1,
            eos_ids: Sequence[int] = (), reuse: PrefixReuse | None = None) -> DecodeState:
    """Run the prompt into a fresh context; the first new token is the engine's argmax after the prompt.

    With ``reuse`` the longest stored state of a recurring prefix is restored instead of recomputed (exact: the
    engine's rows do not depend on how the prompt was split into passes)."""
    first = reuse.prefill(engine, prompt_ids) if reuse is not None else engine.prefill(prompt_ids)
    state = DecodeState(list(prompt_ids), [first], max_new_tokens, frozenset(eos_ids), engine.vocab_size)
    state.done = first in state.eos_ids or max_new_tokens <= 1
    return state


def propose(state: DecodeState, source: DraftSource, k: int) -> Proposal:
    """The draft of at most k tokens ``source`` proposes to continue prompt + output.

    Token ids outside the vocabulary end the draft (a draft may be wrong, never invalid)."""
    if k <= 0:
        return Proposal()
    raw = source.propose(state.context, k)
    draft = [int(t) for t in raw[:k]]
    for i, tok in enumerate(draft):
        if not 0 <= tok < state.vocab_size:
            draft = draft[:i]
            break
    return Proposal(draft, getattr(raw, "key", None), getattr(raw, "prior", None))


def select_draft(state: DecodeState, sources: Sequence[DraftSource],
                 policy: DraftPolicy) -> tuple[int | None, Proposal]:
    """(source index, draft) with the best expected gain this step, or (None, []) for a plain step.

    A source that raises is reported (``state.notices``) and not asked again in this answer."""
    best_gain, best_index, best = 1.0, None, Proposal()
    for i, k in policy.ask(state.remaining):
        if i in state.broken:
            continue
        if not getattr(sources[i], "cheap", False) and policy.promise(i) <= best_gain:
            continue  # a costly source is asked only when its record beats the best draft in hand
        try:
            draft = propose(state, sources[i], k)
        except Exception as exc:  # a broken draft costs speed, never the answer
            _disable(state, sources, i, "propose", exc)
            continue
        if not draft:
            continue
        n, gain = policy.judge(i, draft)
        if n and gain > best_gain:
            best_gain, best_index, best = gain, i, Proposal(draft[:n], draft.key, draft.prior)
    return best_index, best


def verify(engine: Engine, state: DecodeState, draft: list[int], pad: int = 0) -> list[int]:
    """ONE pass over [last accepted token] + draft; the engine's argmax after each input: g_0..g_k.

    ``pad`` extra inputs make the pass longer where a longer pass is faster (DraftPolicy.pass_length); causal
    attention keeps them out of every earlier position, and the engine drops them. The context grows by k + 1
    positions (``accept`` rolls the rejected ones back)."""
    return engine.verify([state.output[-1], *draft], pad=pad)


def accept(engine: Engine, state: DecodeState, draft: list[int], greedy: list[int]) -> int:
    """Keep the longest prefix of ``draft`` equal to the engine's greedy tokens, then its own next token.

    d_i is kept iff d_j == g_{j-1} for all j <= i; the step emits d_1..d_n, g_n. Like greedy decoding, the output
    stops right after an eos token and never exceeds max_new_tokens. The context is rolled back to
    prompt + output[:-1]. Returns n, the number of draft tokens emitted."""
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
    engine.rollback(len(state.prompt_ids) + len(state.output) - 1)
    return min(n, len(new))


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Tally:
    """Draft counts of one answer, overall and per source."""

    per_source: dict[str, dict[str, int]]
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    def add(self, sources: Sequence[DraftSource], used: int | None, draft: list[int], n: int) -> None:
        self.steps += 1
        if used is None:
            return
        counts = self.per_source[sources[used].name]
        counts["proposals"] += 1
        counts["drafted"] += len(draft)
        counts["accepted"] += n
        self.drafted += len(draft)
        self.accepted += n


@torch.inference_mode()
def speculative_generate(engine, prompt_ids: list[int], max_new_tokens: int, eos_ids: Sequence[int],
                         sources: Sequence[DraftSource] = (), policy: DraftPolicy | None = None,
                         on_tokens: Callable[[list[int]], None] | None = None,
                         reuse: PrefixReuse | None = None) -> GenerationResult:
    """Greedy decoding of ``engine`` (an Engine, or a Hugging Face model, wrapped) after ``prompt_ids``,
    accelerated by draft ``sources``; output identical to the engine's plain greedy decoding (new tokens only,
    eos included)."""
    _validate(prompt_ids, max_new_tokens)
    engine = as_engine(engine)
    notices: list[str] = []
    sources = _usable(engine, list(sources), notices)
    policy = policy or DraftPolicy()
    tally = _Tally({s.name: {"proposals": 0, "drafted": 0, "accepted": 0} for s in sources})
    layers = sorted({layer for s in sources for layer in getattr(s, "wants_features", ()) or ()})
    if layers:
        engine.tap(layers)  # no hooks at all when nobody asks for features
    try:
        t0 = time.perf_counter()
        state = prefill(engine, prompt_ids, max_new_tokens, eos_ids, reuse)
        ttft = time.perf_counter() - t0
        state.notices[:0] = notices
        _emit(state.output, on_tokens)
        policy.start(sources, getattr(engine, "device", "cpu"))
        used, n = None, 0
        while not state.done:
            _observe(engine, state, sources, used, n)
            used, draft = select_draft(state, sources, policy)
            # Padding never runs past the engine's positions.
            room = engine.max_positions - engine.n_positions - (len(draft) + 1)
            pad = max(0, min(policy.pass_length(len(draft)) - 1 - len(draft), room))
            t_pass = time.perf_counter()
            greedy = verify(engine, state, draft, pad=pad)  # host ints: the pass has finished
            policy.observe_pass(len(draft) + 1 + pad, time.perf_counter() - t_pass)
            before = len(state.output)
            n = accept(engine, state, draft, greedy)
            policy.update(used, draft, n)
            tally.add(sources, used, draft, n)
            _emit(state.output[before:], on_tokens)
        seconds = time.perf_counter() - t0
    finally:
        if layers:
            engine.tap(())
    stats = result_stats(engine.name, seconds, ttft, len(state.output), tally.steps, tally.drafted, tally.accepted,
                   tally.per_source)
    stats["notices"] = state.notices
    return GenerationResult(list(state.output), stats)


def _usable(engine: Engine, sources: list[DraftSource], notices: list[str]) -> list[DraftSource]:
    """The sources this engine can serve: one that wants layer features is skipped where the engine has none."""
    if callable(getattr(engine, "tap", None)):
        return sources
    kept = []
    for source in sources:
        if getattr(source, "wants_features", ()):
            message = (f"draft source {source.name} needs the base model's layer outputs, which the {engine.name} "
                       "engine does not provide; answering without it")
            log.warning(message)
            notices.append(message)
        else:
            kept.append(source)
    return kept


def _observe(engine: Engine, state: DecodeState, sources: Sequence[DraftSource], used: int | None, n: int) -> None:
    """Tell every source that listens (``observe``) what the last pass kept: after prefill and after every step
    that does not end the answer. ``n`` goes to the source whose draft was verified, None to the others."""
    context = state.context
    for i, source in enumerate(sources):
        observe = getattr(source, "observe", None)
        if i in state.broken or not callable(observe):
            continue
        mine = n if i == used else None
        try:
            if getattr(source, "wants_features", ()):
                observe(context, mine, engine.features)
            else:
                observe(context, mine)
        except Exception as exc:  # as in select_draft: the source goes, the answer stays exact
            _disable(state, sources, i, "observe", exc)


def _disable(state: DecodeState, sources: Sequence[DraftSource], index: int, phase: str, exc: Exception) -> None:
    state.broken.add(index)
    state.notice(f"draft source {sources[index].name} failed in {phase} ({type(exc).__name__}: {exc}); "
                 "answering without it")


def _validate(prompt_ids: list[int], max_new_tokens: int) -> None:
    if not prompt_ids:
        raise ValidationError("the prompt is empty: give at least one token id")
    if max_new_tokens < 1:
        raise ValidationError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")


def _emit(tokens: list[int], on_tokens: Callable[[list[int]], None] | None) -> None:
    if on_tokens is not None and tokens:
        on_tokens(list(tokens))


def result_stats(engine: str | None, seconds: float, ttft: float, new_tokens: int, steps: int, drafted: int,
                 accepted: int, per_source: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The stats of one answer (the ``stats`` object of `--generate --json`); ``replayed`` is set by kvdb.replay."""
    return {"seconds": round(seconds, 6), "new_tokens": new_tokens, "verify_steps": steps, "drafted": drafted,
            "accepted": accepted, "engine": engine, "time_to_first_token": round(ttft, 6),
            "tokens_per_second": round(new_tokens / seconds, 3) if seconds > 0 else 0.0,
            "accepted_per_step": round(accepted / steps, 3) if steps else 0.0, "sources": per_source,
            "replayed": False, "notices": []}


# ----------------------------------------------------------------------------------------------------------------
# Baselines


class _FirstTokenClock:
    """A generate() streamer that only notes when the first new token arrives (its first put is the prompt)."""

    def __init__(self, device):
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


def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: Sequence[int],
                    **generate_kwargs: Any) -> GenerationResult:
    """The baseline: plain greedy decoding, no drafts; same result type and stats keys.

    ``model``: a Hugging Face model or the transformers engine (its ``model.generate(do_sample=False)``), or any
    other engine (its own one-token steps). ``generate_kwargs`` pass Hugging Face's own greedy accelerations for
    comparison (``prompt_lookup_num_tokens``, ``assistant_early_exit``); their draft counts are not visible from
    outside, so those stats stay 0."""
    _validate(prompt_ids, max_new_tokens)
    if isinstance(model, Engine):
        if getattr(model, "model", None) is None:
            if generate_kwargs:
                raise ValidationError(f"the {model.name} engine has no Hugging Face generate to pass "
                                      f"{', '.join(generate_kwargs)} to")
            return _engine_greedy(model, prompt_ids, max_new_tokens, eos_ids)
        model = model.model
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
    eos = list(eos_ids) or None
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    clock = _FirstTokenClock(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, streamer=clock, **generate_kwargs)  # [1, T + new]
    new = out[0, len(prompt_ids):].tolist()
    seconds = time.perf_counter() - t0
    ttft = (clock.first_at - t0) if clock.first_at is not None else seconds
    steps = 0 if generate_kwargs else max(len(new) - 1, 0)  # plain greedy: one pass per token after the prefill
    return GenerationResult(new, result_stats("transformers", seconds, ttft, len(new), steps, 0, 0, {}))


def _engine_greedy(engine: Engine, prompt_ids: list[int], max_new_tokens: int,
                   eos_ids: Sequence[int]) -> GenerationResult:
    """An engine's own plain greedy decoding: the prompt in one pass, then one token per pass, argmax."""
    eos = frozenset(eos_ids)
    t0 = time.perf_counter()
    out = [engine.prefill(prompt_ids)]
    ttft = time.perf_counter() - t0
    while len(out) < max_new_tokens and out[-1] not in eos:
        out.append(engine.verify([out[-1]])[0])
    seconds = time.perf_counter() - t0
    return GenerationResult(out, result_stats(engine.name, seconds, ttft, len(out), len(out) - 1, 0, 0, {}))


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
        _emit(tokens, on_tokens)
        if tokens[-1] in eos:
            break
    seconds = time.perf_counter() - t0
    stats = result_stats(None, seconds, ttft or seconds, len(output), 0, len(output), 0, {})
    stats["draft_calls"] = steps
    return GenerationResult(output, stats)


__all__ = ["DecodeState", "GenerationResult", "accept", "draft_only_generate", "greedy_generate", "prefill",
           "propose", "select_draft", "speculative_generate", "verify"]
