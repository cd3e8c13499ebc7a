"""Logging: the library logs and never prints; the CLI shows notices on stderr by default, progress with -v, errors
only with -q, and keeps --json's stdout clean."""

from __future__ import annotations

import ast
import json
import logging
import os
from pathlib import Path

import pytest

from kvdb import logs
from tests.conftest import Kvdb

PACKAGE = Path(__file__).resolve().parent.parent / "kvdb"


def test_library_never_prints():
    """print() belongs to the CLI only; everything else logs through its module's logger."""
    printing = []
    for folder, _dirs, files in os.walk(PACKAGE):  # not into kvdb/migrations: a link to migrations/
        for name in files:
            path = Path(folder) / name
            if not name.endswith(".py") or path == PACKAGE / "cli.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            printing += [f"{path.relative_to(PACKAGE)}:{node.lineno}" for node in ast.walk(tree)
                         if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]
    assert printing == []


@pytest.mark.parametrize("verbose, quiet, level", [(0, False, logging.WARNING), (1, False, logging.INFO),
                                                   (2, False, logging.DEBUG), (3, True, logging.ERROR)])
def test_levels(verbose, quiet, level):
    assert logs.level_for(verbose, quiet) == level


def test_records_reach_the_current_stderr_with_a_prefix(capsys):
    logs.configure()
    logs.configure()  # configuring again replaces the handler instead of adding a second one
    logger = logging.getLogger("kvdb.somewhere")
    logger.info("progress")
    logger.warning("fell back to copying")
    assert capsys.readouterr() == ("", "notice: fell back to copying\n")
    logs.configure(verbose=1)
    logger.info("progress")
    assert capsys.readouterr().err == "kvdb.somewhere: progress\n"
    logs.configure(quiet=True)
    logger.warning("hidden")
    logger.error("shown")
    assert capsys.readouterr().err == "error: shown\n"
    logs.configure()


def test_cli_verbosity_options(home):
    kv = Kvdb(home)
    quiet = kv("-q", "init", "--json")
    assert json.loads(quiet.stdout)["home"] == str(home.resolve()) and quiet.stderr == ""
    verbose = Kvdb(home.parent / "other")("-v", "init", "--json")
    assert json.loads(verbose.stdout)["revision"]  # stdout holds the JSON only
    assert "kvdb.store.db: creating the store schema" in verbose.stderr
    assert "creating the store schema" not in Kvdb(home.parent / "third")("init").stderr
    Kvdb(home.parent / "fourth")("init")  # the default level again for the next test in this process
