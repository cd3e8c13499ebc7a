"""scripts/gpu_check.sh cannot run here (no GPU; its --dry-run takes minutes): check that it parses and that the
kvdb commands, options and bench methods it calls exist, so it does not fail on a typo the day a GPU is lent."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvdb.bench import METHODS
from kvdb.cli import cli

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _kvdb_calls(text: str) -> list[list[str]]:
    """Each `step NAME LIMIT "${KVDB[@]}" ...` line of the script, continued lines joined, as its words."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.split('"${KVDB[@]}"', 1)[1].split() for line in joined.splitlines() if '"${KVDB[@]}"' in line
            and line.strip().startswith(("step", "&&"))]


def test_every_kvdb_call_uses_existing_options():
    calls = _kvdb_calls(SCRIPT.read_text())
    assert [c[c.index("-v") + 1] if "-v" in c else c[0] for c in calls] == ["add", "build", "train", "bench"]
    runner = CliRunner()
    for words in calls:
        options = [w for w in words if w.startswith("-") and w != "-v"]
        command = words[words.index("-v") + 1] if "-v" in words else words[0]
        helptext = runner.invoke(cli, [command, "--help"]).output
        for option in options:
            assert re.search(rf"(^|[\s,]){re.escape(option)}([\s,/]|$)", helptext, re.M), (command, option)
        if command == "bench":
            methods = words[words.index("--methods") + 1].split(",")
            assert set(methods) <= set(METHODS)
    assert "-v" in runner.invoke(cli, ["--help"]).output
