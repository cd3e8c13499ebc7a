"""Where the library's log records go when kvdb runs as a command.

Library modules log through ``logging.getLogger(__name__)`` and never print; the CLI calls ``configure`` once per
command with its ``-v``/``-q`` count. At the default level a user sees warnings, as ``notice: ...`` lines on stderr
(a fallback the command took, a file it could not write); ``-v`` adds progress facts (``-vv`` debugging detail),
``-q`` leaves errors only. stdout stays the command's own output, so ``--json`` is never mixed with log lines.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "kvdb"
_PREFIX = {logging.WARNING: "notice: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class _Stderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted (click's test runner swaps it per command)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = _PREFIX.get(record.levelno, f"{record.name}: ")
        return prefix + super().format(record)


def level_for(verbose: int, quiet: bool) -> int:
    """``-q``: errors only; none: warnings (notices); ``-v``: info; ``-vv``: debug."""
    if quiet:
        return logging.ERROR
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


def configure(verbose: int = 0, quiet: bool = False) -> None:
    """Send kvdb's records at the chosen level to stderr; calling it again replaces the previous setting."""
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level_for(verbose, quiet))
