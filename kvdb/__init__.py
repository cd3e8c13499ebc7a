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


__all__ = ["KvdbError", "__version__", "open"]
