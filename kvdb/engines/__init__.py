"""Answering engines: the base model behind the one small interface the decoding phases use (kvdb.engines.base).

- ``transformers`` (kvdb.engines.transformers): the Hugging Face model kvdb loads anyway; CUDA bf16 or CPU fp32.
- ``llama_cpp`` (kvdb.engines.llama_cpp): llama.cpp on the same GGUF, the engine CPU users run.

``model.engine: auto`` picks llama.cpp for a GGUF source on the CPU when llama-cpp-python is installed, transformers
otherwise (a GPU, a Hugging Face id or a safetensors folder); env ``KVDB_ENGINE`` overrides the config.
"""

from __future__ import annotations

import importlib.util
import os

from kvdb.engines.base import Engine
from kvdb.errors import ConfigError

ENGINES = ("auto", "transformers", "llama_cpp")


def as_engine(model_or_engine) -> Engine:
    """An engine as it is; a Hugging Face causal LM wrapped in a TransformersEngine (what callers that hold a
    model pass to kvdb.decode)."""
    if isinstance(model_or_engine, Engine):
        return model_or_engine
    from kvdb.engines.transformers import TransformersEngine

    return TransformersEngine(model_or_engine)


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def engine_name(configured: str, lm) -> str:
    """The engine to answer with: env KVDB_ENGINE, else ``configured`` (model.engine); ``auto`` resolved for
    ``lm`` (a loaded kvdb.lm.LM)."""
    name = os.environ.get("KVDB_ENGINE") or configured
    if name not in ENGINES:
        where = "KVDB_ENGINE" if os.environ.get("KVDB_ENGINE") else "model.engine"
        raise ConfigError(f"{where} is {name!r}; choose one of {', '.join(ENGINES)}")
    if name != "auto":
        return name
    on_cpu = lm.device.type == "cpu"
    return "llama_cpp" if lm.ref.gguf_path is not None and on_cpu and llama_cpp_installed() else "transformers"


def open_engine(name: str, lm, threads: int = 0) -> Engine:
    """The engine ``name`` (not auto) for the loaded model ``lm``; llama.cpp reads the same GGUF that ``lm`` was
    converted from, with ``threads`` CPU threads (0: as many as torch uses)."""
    if name == "transformers":
        from kvdb.engines.transformers import TransformersEngine

        return TransformersEngine(lm.model, fingerprint=lm.fingerprint)
    import torch

    from kvdb.engines.llama_cpp import LlamaCppEngine

    return LlamaCppEngine.from_ref(lm.ref, n_ctx=min(lm.max_positions, 8192),
                                   n_threads=threads or torch.get_num_threads())


__all__ = ["ENGINES", "Engine", "as_engine", "engine_name", "llama_cpp_installed", "open_engine"]
