"""One error hierarchy for the library; ``kvdb.cli`` turns these into one-line click errors in one place."""


class KvdbError(Exception):
    """Base class: the message is a sentence a user can act on."""

    exit_code = 1


class ConfigError(KvdbError):
    """A config file is missing, malformed, or has an unknown or mistyped key."""


class ValidationError(KvdbError):
    """User input (a pair, a file, an option) is not acceptable; nothing was stored."""

    exit_code = 2


class NotFoundError(KvdbError):
    """A pair, domain, file or checkpoint that was asked for does not exist."""


class AmbiguousError(KvdbError):
    """A hash prefix matches more than one pair."""


class ConflictError(KvdbError):
    """The write would change something stored without being told to (e.g. a new answer without --replace)."""


class SchemaError(KvdbError):
    """The database is not at the schema revision this code expects."""


class StoreError(KvdbError):
    """The database cannot be opened or written (read-only, disk full, locked too long)."""


class ModelError(KvdbError):
    """A base model, tokenizer or embedder cannot be found or loaded."""


class NotBuiltError(KvdbError):
    """An operation needs vectors or an index that have not been built for the current model."""


class CorruptError(KvdbError):
    """A stored blob, index file, cache or checkpoint fails its checks."""


class IndexCorruptError(CorruptError):
    """A FAISS index file on disk is truncated, unreadable or disagrees with its metadata."""


class ForeignFileError(KvdbError):
    """A .pth file is not a kvdb cache/checkpoint, or was made for another base model or draft shape."""


class DistributedError(KvdbError):
    """Under torchrun, another rank stopped (its own error says why) or the ranks could not reach each other."""


class AnswerCancelled(KvdbError):
    """An answer was stopped before it finished (its caller asked to stop, e.g. a client went away)."""
