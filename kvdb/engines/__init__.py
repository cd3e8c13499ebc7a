"""Answering engines: the base model behind the one small interface the decoding phases use (kvdb.engines.base)."""

from __future__ import annotations

from kvdb.engines.base import Engine


def as_engine(model_or_engine) -> Engine:
    """An engine as it is; a Hugging Face causal LM wrapped in a TransformersEngine (what callers that hold a
    model pass to kvdb.decode)."""
    if isinstance(model_or_engine, Engine):
        return model_or_engine
    from kvdb.engines.transformers import TransformersEngine

    return TransformersEngine(model_or_engine)


__all__ = ["Engine", "as_engine"]
