"""Answering engines: the base model behind the one small interface the decoding phases use (kvdb.engines.base)."""

from kvdb.engines.base import Engine

__all__ = ["Engine"]
