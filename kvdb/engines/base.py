"""The interface between the decoding loop (kvdb.decode) and whatever runs the base model.

An engine holds ONE growing context (the token ids the model has run, with their KV state) and offers the three
operations lossless speculative decoding needs, so the loop never touches a framework:

    first  = engine.prefill(prompt_ids)        # context = prompt; the argmax after the prompt's last token
    greedy = engine.verify([last, *draft])     # ONE pass appending these inputs; the argmax after each of them
    engine.rollback(n)                         # keep only the first n positions of the context

Exactness contract: ``verify`` must give, for every row, the argmax that a one-token step over the same context would
give (the engine's own plain greedy decoding). Each engine states how it meets this (kvdb.engines.transformers:
same dtype and device, up to floating-point ties; kvdb.engines.llama_cpp: a build whose batched rows are computed
like single-token steps).

Optional: ``exact_batches`` (bool), true when every row of a batched pass is computed exactly as a one-token step
would compute it; such an engine's answer to a prompt is its plain greedy output bit for bit, so kvdb.replay may
return it again for the same prompt without running the model.

Optional, for learned drafts that read the base model's hidden states: ``tap(layers)`` (1-based decoder layers to
keep, ``()`` to stop) and ``features`` (layer -> [m, H] rows of the last prefill or verify pass still in the
context, i.e. positions ``n_positions - m .. n_positions - 1``). The loop skips, with a notice, a source that wants
features when the engine has no ``tap``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Engine(Protocol):
    name: str  # "transformers" | "llama_cpp": reported in --generate --json stats as "engine"
    vocab_size: int  # token ids outside [0, vocab_size) end a draft
    max_positions: int  # the context may never grow past this

    @property
    def n_positions(self) -> int:
        """How many positions the context holds now."""
        ...

    def describe(self) -> dict[str, Any]:
        """Everything that changes the engine's numbers (model fingerprint, engine and build, dtype, device, threads):
        part of every key under which a result of this engine is kept."""
        ...

    def prefill(self, prompt_ids: Sequence[int]) -> int:
        """Start a fresh context holding ``prompt_ids``; return the greedy token after the last one."""
        ...

    def verify(self, tokens: Sequence[int], pad: int = 0) -> list[int]:
        """Append ``tokens`` to the context in ONE pass; return the greedy token after each of them.

        ``pad`` extra inputs may be run where a longer pass is faster; they leave the context before returning."""
        ...

    def rollback(self, n_positions: int) -> None:
        """Keep only the first ``n_positions`` positions of the context (drop rejected draft rows)."""
        ...
