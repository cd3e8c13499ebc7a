"""The llama.cpp engine: a GGUF model on the CPU through llama-cpp-python's low-level API.

One context holds one sequence (seq 0). ``prefill`` clears it and decodes the prompt, asking llama.cpp for the logits
of the last row only; ``verify`` decodes k tokens in one pass with logits for every row; ``rollback`` removes the KV
cells at and past a position (``llama_memory_seq_rm``), so the next tokens land in the same cells a plain run uses.

Exactness: the engine's plain greedy decoding (``greedy``: the prompt in one batch, then one token per step, argmax)
is what kvdb's output must equal. A k-token pass gives the same argmax at every row only if llama.cpp computes each
row of a batch exactly as a one-token step; the default CPU build does not (its LLAMAFILE sgemm and repacked
kernels differ from the single-row path). llama-cpp-python built with ``-DGGML_LLAMAFILE=OFF -DGGML_CPU_REPACK=OFF``
does, so ``describe()`` records both flags and kvdb keys every stored result by them.

Prefix states: ``save_state`` copies the KV cells of the context (``llama_state_seq_get_data``) together with the
exact token ids, ``describe()`` and the greedy token after the last position; ``restore_state`` loads one back into
a cleared context only when ``describe()`` matches, and ``prefill_from`` restores a state whose tokens begin the
prompt and decodes the rest, which gives the rows a full prefill gives (each row is computed independently of its
batch on the exact build).
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Collection, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from kvdb.engines.statecache import PrefixState, describe_key
from kvdb.errors import CorruptError, ModelError, ValidationError
from kvdb.identity import ModelRef, sha256_file

log = logging.getLogger(__name__)


def import_llama_cpp():
    """The llama_cpp module, or a ModelError that says how to install it."""
    try:
        import llama_cpp
        import llama_cpp._internals  # the model, context and batch wrappers
        from llama_cpp import _logger
    except (ImportError, OSError, RuntimeError):  # not installed, or its shared library does not load
        raise ModelError("the llama.cpp engine needs a working llama-cpp-python: run `make install` (it builds "
                         "llama.cpp with exact batched rows once)") from None
    _logger.set_verbose(False)  # llama.cpp's own load chatter goes nowhere; its errors still reach stderr
    return llama_cpp


@cache
def build_identity() -> dict[str, Any]:
    """Which llama.cpp this is and whether its batched rows can differ from one-token steps (LLAMAFILE, REPACK)."""
    llama_cpp = import_llama_cpp()
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    flags = dict(re.findall(r"(\w+) = (\w+)", info))
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp": llama_cpp.llama_version().decode() if hasattr(llama_cpp, "llama_version") else None,
        "system_info": " ".join(info.split()),
        "llamafile": flags.get("LLAMAFILE") == "1",
        "repack": flags.get("REPACK") == "1",
    }


def exact_build() -> bool:
    """True when this llama.cpp build computes every row of a batched pass like a one-token step."""
    ident = build_identity()
    return not ident["llamafile"] and not ident["repack"]


class LlamaCppEngine:
    """A GGUF model in one llama.cpp context, behind kvdb.engines.base.Engine."""

    name = "llama_cpp"

    def __init__(self, gguf_path: str | Path, *, n_ctx: int = 4096, n_threads: int = 2, n_batch: int = 512,
                 fingerprint: str | None = None):
        llama_cpp = import_llama_cpp()
        self._lib = llama_cpp
        self.path = Path(gguf_path)
        if not self.path.is_file():
            raise ModelError(f"GGUF file {self.path} does not exist")
        self.fingerprint = fingerprint or sha256_file(self.path)
        self.n_threads, self.n_batch = n_threads, min(n_batch, n_ctx)
        self._model = self._load_model()
        self._ctx = self._new_context(n_ctx)
        self._batch = llama_cpp._internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.vocab_size: int = self._model.n_vocab()
        self.max_positions: int = self._ctx.n_ctx()
        self._ids: list[int] = []
        self._argmax: list[int | None] = []  # greedy token after each position, where its row was computed
        # Whether every row of a batched pass equals a one-token step: then this engine's answers are its
        # deterministic greedy output and may be replayed for the same prompt (kvdb.replay).
        self.exact_batches: bool = exact_build()
        if not self.exact_batches:
            log.warning("llama.cpp was built with LLAMAFILE or CPU REPACK on: batched verification can differ "
                        "from one-token greedy decoding at near-ties; rebuild with `make install`")

    @classmethod
    def from_ref(cls, ref: ModelRef, **settings: Any) -> LlamaCppEngine:
        """The engine for a resolved model source (kvdb.identity.resolve_model); only GGUF sources have one."""
        if ref.gguf_path is None:
            raise ModelError(f"the llama.cpp engine needs a GGUF model, and {ref.source} is not one; "
                             "set model.engine to transformers")
        return cls(ref.gguf_path, fingerprint=ref.fingerprint, **settings)

    def _load_model(self):
        params = self._lib.llama_model_default_params()
        params.n_gpu_layers = 0
        try:
            return self._lib._internals.LlamaModel(path_model=str(self.path), params=params, verbose=False)
        except ValueError:
            raise ModelError(f"llama.cpp cannot load {self.path}: the file is truncated, corrupt or not a GGUF "
                             "model; reinstall or re-download it") from None

    def _new_context(self, n_ctx: int):
        """A context set up like ``Llama(n_ctx, n_batch, n_threads=n_threads_batch=n_threads)`` (flash attention
        off, f16 KV cache), so ``greedy`` equals ``Llama.generate(temp=0)`` on the same settings."""
        params = self._lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = min(self.n_batch, 512)
        params.n_threads = params.n_threads_batch = self.n_threads
        params.flash_attn_type = self._lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_seq_max = 1
        try:
            return self._lib._internals.LlamaContext(model=self._model, params=params, verbose=False)
        except ValueError:
            raise ModelError(f"llama.cpp cannot make a context of {n_ctx} positions for {self.path}; "
                             "lower model.n_ctx") from None

    # ---- the Engine interface ----

    @property
    def n_positions(self) -> int:
        return len(self._ids)

    @property
    def context_ids(self) -> list[int]:
        """The token ids the context holds now."""
        return list(self._ids)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "model": self.fingerprint,
            "n_ctx": self.max_positions,
            "n_threads": self.n_threads,
            "n_batch": self.n_batch,
            "n_ubatch": min(self.n_batch, 512),
            "flash_attn": False,
            "kv_type": "f16",
            "build": build_identity(),
        }

    def prefill(self, prompt_ids: Sequence[int]) -> int:
        if not prompt_ids:
            raise ValidationError("the prompt is empty; give at least one token")
        self._clear()
        return self.extend(prompt_ids)

    def verify(self, tokens: Sequence[int], pad: int = 0) -> list[int]:
        """One pass over ``tokens`` (``pad`` is ignored: on the CPU a longer pass is never cheaper)."""
        return [int(t) for t in np.argmax(self.verify_logits(tokens), axis=1)]

    def verify_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` in one pass; the logits after each of them (k x vocab, float32)."""
        if not tokens:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        return self._decode(list(tokens), all_rows=True)

    def rollback(self, n_positions: int) -> None:
        if not 0 <= n_positions <= len(self._ids):
            raise ValueError(f"cannot roll back to {n_positions} positions: the context holds {len(self._ids)}")
        if n_positions == len(self._ids):
            return
        if not self._lib.llama_memory_seq_rm(self._ctx.memory, 0, n_positions, -1):
            raise ModelError("llama.cpp refused to drop KV cells from this context")
        del self._ids[n_positions:], self._argmax[n_positions:]

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """llama.cpp's own tokenization of ``text`` (special tokens such as <|im_start|> parsed as such)."""
        return list(self._model.tokenize(text.encode(), add_bos, True))

    # ---- plain greedy decoding: the baseline kvdb's output must equal ----

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Collection[int] = ()) -> list[int]:
        """The prompt in one batch, then one token per step, argmax; new tokens only (an ending eos included)."""
        out = [self.prefill(prompt_ids)]
        while len(out) < max_new_tokens and out[-1] not in eos_ids:
            out.append(self.verify([out[-1]])[0])
        return out[:max_new_tokens] if max_new_tokens > 0 else []

    # ---- prefix states ----

    def save_state(self) -> PrefixState:
        """The KV state of the whole context, with its token ids and the greedy token after the last one."""
        if not self._ids:
            raise ValueError("the context is empty: prefill before saving a state")
        if self._argmax[-1] is None:  # rolled back into a prefill: recompute the last row as a one-token step
            last = self._ids[-1]
            self.rollback(len(self._ids) - 1)
            self.verify([last])
        size = self._lib.llama_state_seq_get_size(self._ctx.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = self._lib.llama_state_seq_get_data(self._ctx.ctx, buf, size, 0)
        if n == 0 or n > size:
            raise ModelError("llama.cpp could not copy the context's KV state")
        return PrefixState(tuple(self._ids), describe_key(self.describe()), bytes(buf)[:n], int(self._argmax[-1]))

    def restore_state(self, state: PrefixState) -> int:
        """Make the context hold ``state.token_ids`` with the saved KV cells; return the greedy token after them."""
        if state.engine != describe_key(self.describe()):
            raise ValidationError("this prefix state was saved by another model, build or engine setting; "
                                  "it cannot be restored here")
        if len(state.token_ids) > self.max_positions:
            raise ValidationError(f"the prefix state holds {len(state.token_ids)} positions but the context holds "
                                  f"{self.max_positions}; raise model.n_ctx")
        self._clear()
        buf = (ctypes.c_uint8 * len(state.kv)).from_buffer_copy(state.kv)
        loaded = self._lib.llama_state_seq_set_data(self._ctx.ctx, buf, len(state.kv), 0)
        top = self._lib.llama_memory_seq_pos_max(self._ctx.memory, 0)
        if loaded == 0 or top != len(state.token_ids) - 1:
            self._clear()
            raise CorruptError(f"a saved prefix state of {len(state.token_ids)} tokens did not load into llama.cpp "
                               f"(loaded {loaded} bytes, last position {top}): it is damaged or from another build")
        self._ids = list(state.token_ids)
        self._argmax = [None] * (len(self._ids) - 1) + [state.next_token]
        return state.next_token

    def prefill_from(self, state: PrefixState, prompt_ids: Sequence[int]) -> int:
        """``prefill(prompt_ids)`` starting from a saved state whose tokens begin the prompt."""
        n = len(state.token_ids)
        if tuple(prompt_ids[:n]) != state.token_ids:
            raise ValueError("the prefix state's tokens do not begin this prompt")
        first = self.restore_state(state)
        return self.extend(prompt_ids[n:]) if len(prompt_ids) > n else first

    def extend(self, tokens: Sequence[int]) -> int:
        """Append ``tokens`` as prompt (llama.cpp computes logits for the last row only); the greedy token after
        the last of them. With an empty context this is ``prefill``."""
        if not tokens:
            raise ValidationError("nothing to append; give at least one token")
        self._decode(list(tokens), all_rows=False)
        return int(self._argmax[-1])

    def state_bytes_per_token(self, state: PrefixState) -> float:
        return len(state.kv) / max(1, len(state.token_ids))

    # ---- llama.cpp calls ----

    def _clear(self) -> None:
        # Metadata only, like Llama.generate's reset: unused cells are masked out of attention, so their old (finite)
        # contents add exact zeros; zeroing the buffers would cost ~1.5 ms per 4096 positions for nothing.
        self._lib.llama_memory_clear(self._ctx.memory, False)
        self._ids, self._argmax = [], []

    def _decode(self, tokens: list[int], all_rows: bool) -> np.ndarray:
        """Append ``tokens`` (in passes of n_batch); the logits of every row, or of the last row only."""
        if len(self._ids) + len(tokens) > self.max_positions:
            raise ValidationError(f"the context would need {len(self._ids) + len(tokens)} positions but llama.cpp "
                                  f"holds {self.max_positions}; raise model.n_ctx or shorten the prompt")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise ValidationError(f"token id {bad[0]} is outside the model's vocabulary of {self.vocab_size}")
        rows = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last_chunk = start + len(chunk) == len(tokens)
            rows.append(self._decode_chunk(chunk, all_rows, last_chunk))
        return np.concatenate([r for r in rows if r is not None])

    def _decode_chunk(self, chunk: list[int], all_rows: bool, last_chunk: bool) -> np.ndarray | None:
        b, n0 = self._batch.batch, len(self._ids)
        b.n_tokens = len(chunk)
        for i, tok in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = tok, n0 + i, 1, 0
            b.logits[i] = all_rows or (last_chunk and i == len(chunk) - 1)
        rc = self._lib.llama_decode(self._ctx.ctx, b)
        if rc != 0:  # drop whatever part of the chunk llama.cpp kept, so the cells match self._ids again
            self._lib.llama_memory_seq_rm(self._ctx.memory, 0, n0, -1)
            raise ModelError(f"llama.cpp failed to decode {len(chunk)} tokens at position {n0} (code {rc})")
        self._ids += chunk
        if not (all_rows or last_chunk):
            self._argmax += [None] * len(chunk)
            return None
        n_out = len(chunk) if all_rows else 1
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx.ctx),
                                       shape=(n_out, self.vocab_size)).copy()
        top = [int(t) for t in np.argmax(logits, axis=1)]
        self._argmax += top if all_rows else [None] * (len(chunk) - 1) + top
        return logits

    def close(self) -> None:
        for part in (self._batch, self._ctx, self._model):
            part.close()

    def __enter__(self) -> LlamaCppEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
