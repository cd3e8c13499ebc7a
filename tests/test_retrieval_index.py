"""The flat16 index kind (flat over fp16 copies of the vectors) that ``auto`` picks between 50k and 200k vectors:
near-exact cosines, filters, removal and the save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest

from kvdb.errors import ValidationError
from kvdb.index import IndexSpec, VectorIndex


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_auto_goes_exact_flat_then_flat16_then_hnsw():
    spec = IndexSpec(auto_exact_max=10, auto_flat_max=20)
    assert [spec.resolve(n)[0] for n in (10, 11, 20, 21)] == ["flat", "flat16", "flat16", "hnsw"]
    assert IndexSpec().resolve(50_000)[0] == "flat" and IndexSpec().resolve(200_000)[0] == "flat16"
    with pytest.raises(ValidationError, match="auto_exact_max"):
        IndexSpec(auto_exact_max=-1)


def test_flat16_ranks_like_flat_with_near_exact_cosines(tmp_path):
    x = unit_vectors(3000, 32)
    ids = np.arange(3000, dtype=np.int64) * 16 + 1
    q = unit_vectors(20, 32, seed=1)
    exact = VectorIndex.build(ids, x, IndexSpec(kind="flat"))
    half = VectorIndex.build(ids, x, IndexSpec(kind="flat16"))
    assert half.kind == "flat16"
    for e, h in zip(exact.search(q, 10), half.search(q, 10)):
        assert [i for i, _ in h[:3]] == [i for i, _ in e[:3]]
        assert max(abs(a - b) for (_, a), (_, b) in zip(e, h)) < 2e-3

    allowed = ids[::7]
    (filtered,) = half.search(q[:1], 5, allowed_ids=allowed)
    assert filtered and all(i in set(allowed.tolist()) for i, _ in filtered)

    half.save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    assert loaded.kind == "flat16" and loaded.search(q, 10) == half.search(q, 10)

    top = half.search(q[:1], 1)[0][0][0]
    assert loaded.remove_ids(np.array([top])) == 1
    assert top not in [i for i, _ in loaded.search(q[:1], 10)[0]]
