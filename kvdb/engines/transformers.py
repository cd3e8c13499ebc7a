"""The transformers engine: a Hugging Face causal LM behind kvdb.engines.base.Engine, on one DynamicCache.

It owns what the decoding loop must not know about: the KV cache (created by kvdb.lm.new_cache, passed under the
keyword this transformers version takes, kvdb.lm.cache_keyword), rolling it back, the padding of short verify
passes, the kernel chosen per pass length (kvdb.kernels, chosen by kvdb.passcost) and the optional layer taps
for learned drafts (kvdb.lm.LayerTap).

Exactness: a verify pass computes k + 1 positions in one forward where ``generate`` computes one per forward; on
the same dtype and device the argmax agrees except where the top two logits tie to the last bits.

Models whose cache cannot be rolled back are refused at construction: sliding-window layers are rolled back with
transformers' past recording (``activate_past_recording``), which older releases lack; recurrent or linear-attention
state, chunked attention and other layer kinds are refused outright.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from kvdb.errors import ModelError
from kvdb.kernels import transposed_rows
from kvdb.lm import LayerTap, cache_keyword, new_cache

# Generation-config settings under which Hugging Face's greedy ``generate`` is not a plain argmax, with the values
# that leave it one. Sampling-only settings (temperature, top_k, top_p, ...) are absent: greedy ignores them.
_GREEDY_CHANGERS: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1), "num_beam_groups": (None, 1), "diversity_penalty": (None, 0.0),
    "constraints": (None,), "force_words_ids": (None,), "penalty_alpha": (None, 0.0), "dola_layers": (None,),
    "guidance_scale": (None, 1.0), "watermarking_config": (None,), "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "min_new_tokens": (None, 0),
    "stop_strings": (None,), "token_healing": (None, False),
}


def check_plain_greedy(model, prompt_len: int) -> None:
    """Refuse a model whose generation config makes greedy ``generate`` differ from a plain argmax (beam search,
    guidance, watermarking, penalties, forced or suppressed tokens, a minimum length, stop strings): speculative
    decoding could not match it."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return
    for name, neutral in _GREEDY_CHANGERS.items():
        value = getattr(config, name, None)
        if not any(value is n or value == n for n in neutral):
            _refuse_setting(name, value)
    min_length = getattr(config, "min_length", None) or 0
    if min_length > prompt_len:  # generate suppresses eos while the whole sequence is shorter than min_length
        _refuse_setting("min_length", min_length)


def _refuse_setting(name: str, value: Any) -> None:
    raise ModelError(f"the model's generation config sets {name}={value!r}, so its greedy output is not a plain "
                     "argmax and speculative decoding could not match it; remove it from generation_config.json")


def check_rollback(model, cache) -> None:
    """Refuse a model whose KV cache cannot be cut back to a shorter context; prepare sliding-window layers for it."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text, "attention_chunk_size", None) or "chunked_attention" in (getattr(text, "layer_types", None) or ()):
        _refuse_cache(model, "chunked attention")
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    kinds = {type(layer) for layer in getattr(cache, "layers", ())}
    plain = {DynamicLayer} | {k for k in kinds if k.__name__ == "DummyLayer"}  # DummyLayer stores nothing
    if DynamicSlidingWindowLayer in kinds:
        if not callable(getattr(cache, "activate_past_recording", None)):
            import transformers

            raise ModelError(f"{type(model).__name__} has sliding-window layers, which transformers "
                             f"{transformers.__version__} cannot roll back after a rejected draft; upgrade "
                             "transformers (pip install -U 'transformers<6')")
        cache.activate_past_recording()  # keep full states until each crop, so a crop can cut the rejected rows
        plain.add(DynamicSlidingWindowLayer)
    other = sorted(k.__name__ for k in kinds - plain)
    if other:
        _refuse_cache(model, f"cache layers of kind {', '.join(other)}")


def _refuse_cache(model, what: str) -> None:
    raise ModelError(f"{type(model).__name__} keeps {what}, whose KV cache kvdb cannot roll back after a rejected "
                     "draft; answer with a model of plain (full or sliding-window) attention layers")


class TransformersEngine:
    """A Hugging Face causal LM as an answering engine (kvdb.engines.base.Engine).

    ``transposed_rows``: pass lengths whose linear layers run as ``(W @ x^T)^T`` (kvdb.passcost.PassPlan).
    ``tap(layers)`` asks for the outputs of decoder layers; ``features`` then holds them for the positions of the
    last prefill or verify pass that are still in the context."""

    name = "transformers"

    def __init__(self, model, transposed_rows: Sequence[int] = (), fingerprint: str | None = None):
        self.model = model
        self.fingerprint = fingerprint
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.transposed_rows = frozenset(transposed_rows)
        self._cache_kw = cache_keyword(model)
        self._last_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        check_rollback(model, new_cache(model))
        self._cache = None
        self._n = 0  # positions in the context
        self._cached = 0  # positions in the cache: the context plus rows a rollback has not cut yet
        self._tap: LayerTap | None = None
        self._rows: dict[int, torch.Tensor] = {}  # layer -> [m, H], the tapped rows of the last pass
        self._rows_start = 0  # context position of their first row
        self._sliding = False  # the cache has sliding-window layers: only the last pass can be rolled back
        self._floor = 0  # the shortest context a rollback may leave

    @property
    def n_positions(self) -> int:
        return self._n

    def describe(self) -> dict[str, Any]:
        params = next(self.model.parameters())
        return {"engine": self.name, "fingerprint": self.fingerprint, "architecture": type(self.model).__name__,
                "dtype": str(params.dtype), "device": str(self.device), "threads": torch.get_num_threads()}

    # -- layer taps for learned drafts --

    def tap(self, layers: Sequence[int]) -> None:
        """Keep the outputs of these 1-based decoder layers from now on (an empty list removes the hooks)."""
        if self._tap is not None:
            self._tap.close()
            self._tap = None
        self._rows = {}
        if layers:
            self._tap = LayerTap(self.model, sorted(set(layers)))

    @property
    def features(self) -> dict[int, torch.Tensor] | None:
        """layer -> [m, H]: the tapped rows of the last pass still in the context (positions ``n - m .. n - 1``)."""
        if self._tap is None:
            return None
        keep = max(0, self._n - self._rows_start)
        return {layer: rows[:keep] for layer, rows in self._rows.items()}

    def close(self) -> None:
        self.tap(())

    # -- the three operations --

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[int]) -> int:
        check_plain_greedy(self.model, len(prompt_ids))
        self._cache = new_cache(self.model)
        check_rollback(self.model, self._cache)
        self._sliding = any(getattr(self._cache, "is_sliding", None) or ())
        self._n = self._cached = self._rows_start = self._floor = 0
        only_last = {"logits_to_keep": 1} if self._last_only else {}
        logits = self._forward(list(prompt_ids), **only_last)  # [1 or T, V]
        self._n = self._cached = len(prompt_ids)
        return int(logits[-1].argmax(-1).item())

    @torch.inference_mode()
    def verify(self, tokens: Sequence[int], pad: int = 0) -> list[int]:
        if self._cache is None:
            raise ModelError("verify before prefill: start the context with prefill(prompt_ids)")
        self._settle()
        start = self._n
        inputs = [*tokens, *[tokens[-1]] * pad]  # padding repeats the last input; causal attention hides it
        logits = self._forward(inputs)  # [k + 1 + pad, V]
        self._rows_start = start
        self._floor = start if self._sliding else 0
        self._cached = start + len(inputs)
        self._n = start + len(tokens)  # the padding has left the context; the next settle cuts it from the cache
        return logits[: len(tokens)].argmax(-1).tolist()  # one device-to-host copy per pass

    def rollback(self, n_positions: int) -> None:
        if not self._floor <= n_positions <= self._n:
            raise ModelError(f"cannot roll back to {n_positions} positions: the context holds {self._n}, and this "
                             f"model's cache can go back to {self._floor} at most")
        self._n = n_positions
        self._settle()

    def _settle(self) -> None:
        """Cut the cache to the context in ONE crop. A sliding-window layer that records its past must be cropped
        after every forward (that also trims it to its window), and only rows of the last pass can be cut."""
        if self._cache is None or (self._cached == self._n and not self._sliding):
            return
        self._cache.crop(self._n - self._cached)
        self._cached = self._n
        if self._sliding:
            self._floor = self._n

    def _forward(self, inputs: list[int], **kwargs: Any) -> torch.Tensor:
        ids = torch.tensor([inputs], dtype=torch.long, device=self.device)  # [1, q]
        kernels = (transposed_rows(self.model, self.transposed_rows) if len(inputs) in self.transposed_rows
                   else contextlib.nullcontext())
        with kernels:
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: self._cache}, **kwargs)
        if self._tap is not None:
            self._rows = self._tap.rows(len(inputs))  # taken at once: another forward would overwrite them
        return out.logits[0]  # [q or 1, V]


__all__ = ["TransformersEngine", "check_plain_greedy", "check_rollback"]
