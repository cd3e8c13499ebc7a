"""Crash safety: `kvdb add --file`, `build`, `export` and `train` are SIGKILLed at seeded random moments, and after
each kill the store, its blobs, the index and the files on disk must be whole (see tests/crashkit.py).

The short run here does 12 kills; `make test-slow` runs 52 (and benchmarks/crash_harness.py any number)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.crashkit import Harness
from tests.reliability import db, flip_byte, make_tiny_config


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return make_tiny_config(tmp_path_factory.mktemp("tiny"))


def test_kills_lose_nothing_short(tmp_path, tiny_config):
    harness = Harness(tmp_path, tiny_config, seed=6, log=print)
    tally = harness.run(rounds=1, add=5, build=3, export=2, train=2)
    print(tally.summary())
    assert tally.failures == []
    assert tally.tried == 12 and tally.survived == tally.tried
    assert tally.reruns >= 3 + 5

    # The checks have teeth: damage planted by hand is caught.
    flip_byte(harness.home, "pair_vectors")
    export = next((harness.home / "knowledge_cache").glob("knowledge_cache*.pth"))
    export.write_bytes(export.read_bytes()[:500])
    with db(harness.home) as conn:
        conn.execute("delete from pairs where id = (select max(id) from pairs)")
    assert not harness.verify("planted")
    caught = "\n".join(tally.failures)
    assert "checksum" in caught and "does not load" in caught and "are missing" in caught


@pytest.mark.slow
def test_kills_lose_nothing_long(tmp_path, tiny_config, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the long crash run (about 4 minutes) runs with `make test-slow` (pytest -m slow)")
    harness = Harness(tmp_path, tiny_config, seed=60, log=print)
    tally = harness.run(rounds=4, add=5, build=3, export=3, train=2)
    print(tally.summary())
    assert tally.failures == []
    assert tally.tried >= 50 and tally.survived == tally.tried
