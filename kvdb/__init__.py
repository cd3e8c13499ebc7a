"""kvdb: an embedded knowledge database that makes an LLM answer knowledge questions faster, with the same output."""

__version__ = "0.1.0"
