"""kvdb: an embedded knowledge database that makes an LLM answer knowledge questions faster, with the same output.

    import kvdb
    with kvdb.open(home="var") as kb:
        print(kb.answer("What is a B-tree?").text)
"""

__version__ = "0.1.0"

from kvdb.errors import KvdbError  # noqa: E402


def open(home=None, config=None, **options):
    """Open the knowledge base in ``home`` with ``config`` (the CLI's defaults: env KVDB_HOME and KVDB_CONFIG, else
    ./var and configs/default.yaml) -> kvdb.api.KnowledgeBase, a context manager."""
    from kvdb.api import open as _open

    return _open(home, config, **options)


def __getattr__(name: str):
    if name == "KnowledgeBase":  # imported on first use: it pulls in the store and retrieval modules
        from kvdb.api import KnowledgeBase

        return KnowledgeBase
    raise AttributeError(f"module 'kvdb' has no attribute {name!r}")


__all__ = ["KnowledgeBase", "KvdbError", "__version__", "open"]
