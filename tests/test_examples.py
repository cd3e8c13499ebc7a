"""The default knowledge set: 70 pairs, 10 per seed domain, loaded once however often it is asked for."""

from __future__ import annotations

from collections import Counter

from kvdb.config import StoreConfig
from kvdb.examples import DOMAIN_DESCRIPTIONS, example_pairs
from kvdb.store.pairs import validate
from tests.conftest import Kvdb

SEED_DOMAINS = {"ai_ml", "cs", "math", "physics", "biology", "history", "economics"}


def test_default_set_shape():
    pairs = example_pairs()
    counts = Counter(p.domain for p in pairs)
    assert set(counts) == SEED_DOMAINS == set(DOMAIN_DESCRIPTIONS)
    assert all(n >= 10 for n in counts.values()) and len(pairs) >= 70
    assert len({p.hash for p in pairs}) == len(pairs)
    for p in pairs:
        validate(p, StoreConfig())
        words = len(p.answer.split())
        sentences = sum(p.answer.count(c) for c in ".!?")
        assert 20 <= words <= 120 and 2 <= sentences <= 5, p.question


def test_init_examples_twice_adds_nothing(kv: Kvdb):
    first = kv.json("init", "--examples")
    assert first["examples"]["added"] == 70
    second = kv.json("init", "--examples")
    assert second["examples"] == {"added": 0, "skipped": 70, "replaced": 0}
    domains = kv.json("domains")
    assert {d["name"]: d["count"] for d in domains} == {d: 10 for d in SEED_DOMAINS}
    assert all(d["description"] for d in domains)
    assert kv.count() == 70
