"""Tests for kvdb.index: exactness, id filters, recall of the approximate kinds, and the on-disk checks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from kvdb import index as index_mod
from kvdb.errors import IndexCorruptError, KvdbError, ValidationError
from kvdb.index import FAISS_FILE, META_FILE, IndexSpec, VectorIndex

DIM = 64


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def uniform(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32))


def clustered(n: int, m: int, seed: int, dim: int = DIM, centres: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """n data and m query vectors from one gaussian mixture: embeddings cluster by topic, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, dim), dtype=np.float32))

    def draw(count: int) -> np.ndarray:
        noise = rng.standard_normal((count, dim), dtype=np.float32) / np.sqrt(dim)
        return unit(c[rng.integers(0, centres, count)] + noise)

    return draw(n), draw(m)


def exact_top(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]]


def ids_of(rows: list[list[tuple[int, float]]]) -> list[list[int]]:
    return [[i for i, _ in row] for row in rows]


def recall(rows: list[list[tuple[int, float]]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(t.tolist())) / truth.shape[1] for r, t in zip(ids_of(rows), truth)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """5k clustered vectors with sparse, non-contiguous ids, and 100 queries."""
    x, q = clustered(5000, 100, seed=1)
    ids = np.arange(5000, dtype=np.int64) * 7 + 1_000_003
    return ids, x, q


@pytest.fixture(scope="module")
def built(data) -> dict[str, VectorIndex]:
    ids, x, _ = data
    return {kind: VectorIndex.build(ids, x, IndexSpec(kind=kind), {"kind": kind}) for kind in ("flat", "hnsw", "ivf")}


# ----- exact search and ids -------------------------------------------------------------------------------------


def test_flat_search_returns_numpy_nearest_neighbours() -> None:
    x, q = uniform(2000, seed=2), uniform(30, seed=3)
    rng = np.random.default_rng(4)
    ids = rng.permutation(np.unique(rng.integers(0, 10**12, 2100))[:2000]).astype(np.int64)
    index = VectorIndex.build(ids, x, IndexSpec(kind="flat"), {})
    rows = index.search(q, 5)
    truth = exact_top(x, ids, q, 5)
    assert [row[0][0] for row in rows] == truth[:, 0].tolist()
    assert ids_of(rows) == truth.tolist()
    scores = q @ x.T
    pos = {int(i): p for p, i in enumerate(ids)}
    for qi, row in enumerate(rows):
        got = [s for _, s in row]
        assert got == sorted(got, reverse=True)
        for i, s in row:
            assert s == pytest.approx(float(scores[qi, pos[i]]), abs=1e-5)


def test_ids_round_trip(built, data) -> None:
    ids = data[0]
    for index in built.values():
        got = index.ids()
        assert got.dtype == np.int64
        assert got.tolist() == sorted(ids.tolist())
        assert len(index) == index.ntotal == ids.size
    # Each stored vector finds itself under its own id.
    x = data[1]
    for kind, index in built.items():
        rows = index.search(x[:20], 1)
        assert [r[0][0] for r in rows] == ids[:20].tolist(), kind


def test_k_larger_than_index_returns_everything_without_minus_one() -> None:
    x = uniform(7, seed=5)
    index = VectorIndex.build(np.arange(10, 17, dtype=np.int64), x, IndexSpec(kind="flat"), {})
    rows = index.search(x[:2], 50)
    assert all(len(r) == 7 for r in rows)
    assert all(i >= 10 for r in rows for i, _ in r)


def test_auto_kind_and_ivf_fallback() -> None:
    x = uniform(300, seed=6)
    ids = np.arange(300, dtype=np.int64)
    assert VectorIndex.build(ids, x, IndexSpec(), {}).kind == "flat"
    assert VectorIndex.build(ids, x, IndexSpec(auto_flat_max=100), {}).kind == "hnsw"
    # 300 points cannot train 4*sqrt(300) = 69 centroids well: IVF falls back to flat and still answers exactly.
    small = VectorIndex.build(ids, x, IndexSpec(kind="ivf"), {})
    assert small.kind == "flat"
    assert ids_of(small.search(x[:3], 1)) == [[0], [1], [2]]


# ----- recall of the approximate kinds -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_recall_at_10_vs_exact(built, data, kind) -> None:
    ids, x, q = data
    index = built[kind]
    assert index.kind == kind
    assert recall(index.search(q, 10), exact_top(x, ids, q, 10)) >= 0.9


def test_hnsw_recall_on_uniform_data() -> None:
    # Uniform noise on the sphere has no clusters for IVF's lists to follow (its recall at nprobe 32 of 283 is
    # about 0.6 there, which is why the test above uses clustered data), but a graph index must still cope.
    x, q = uniform(5000, seed=15), uniform(100, seed=16)
    ids = np.arange(5000, dtype=np.int64)
    index = VectorIndex.build(ids, x, IndexSpec(kind="hnsw"), {})
    assert recall(index.search(q, 10), exact_top(x, ids, q, 10)) >= 0.9


# ----- allowed_ids filter ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("fraction", [0.004, 0.1, 0.6])
def test_allowed_ids_filter_returns_k_allowed(built, data, kind, fraction) -> None:
    ids, x, q = data
    rng = np.random.default_rng(7)
    allowed = rng.choice(ids, size=int(ids.size * fraction), replace=False)
    allowed_set = set(allowed.tolist())
    rows = built[kind].search(q, 10, allowed_ids=allowed)
    assert all(len(row) == 10 for row in rows)
    assert all(i in allowed_set for row in rows for i, _ in row)
    # Over the allowed subset the answer is (close to) the exact one.
    mask = np.isin(ids, allowed)
    truth = exact_top(x[mask], ids[mask], q, 10)
    assert recall(rows, truth) >= (1.0 if kind == "flat" else 0.9)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_selector_shortfall_falls_back_to_exact(built, data, kind, monkeypatch) -> None:
    # 100 allowed ids scattered over 5000, searched through the faiss selector (exact shortcut disabled):
    # HNSW with a small efSearch and IVF with nprobe=1 both come back short, so the exact fallback must fill in.
    monkeypatch.setattr(index_mod, "_EXACT_FILTER_MAX", 0)
    exact_calls: list[int] = []
    real_exact = VectorIndex._exact

    def counting_exact(self, q, subset, k):
        exact_calls.append(q.shape[0])
        return real_exact(self, q, subset, k)

    monkeypatch.setattr(VectorIndex, "_exact", counting_exact)
    ids, x, q = data
    spec = IndexSpec(kind=kind, hnsw_ef_search=10, ivf_nprobe=1)
    index = VectorIndex.build(ids, x, spec, {})
    allowed = ids[::50]
    rows = index.search(q, 10, allowed_ids=allowed)
    assert exact_calls and 0 < exact_calls[0] <= q.shape[0]  # the selector really came back short
    assert all(len(row) == 10 for row in rows)
    mask = np.isin(ids, allowed)
    assert recall(rows, exact_top(x[mask], ids[mask], q, 10)) >= 0.9


def test_allowed_ids_edge_cases(built, data) -> None:
    ids, _, q = data
    index = built["hnsw"]
    assert index.search(q[:2], 5, allowed_ids=np.array([], dtype=np.int64)) == [[], []]
    assert index.search(q[:1], 5, allowed_ids=np.array([-5, 42], dtype=np.int64)) == [[]]  # none present
    few = index.search(q[:1], 5, allowed_ids=np.array([ids[3], ids[9], 42]))
    assert sorted(i for i, _ in few[0]) == sorted([int(ids[3]), int(ids[9])])
    with pytest.raises(ValidationError):
        index.search(q[:1], 5, allowed_ids=np.array([1.5, 2.0]))


# ----- empty index and validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "auto"])
def test_empty_index(tmp_path: Path, kind: str) -> None:
    index = VectorIndex.build(np.empty(0, dtype=np.int64), np.empty((0, DIM), dtype=np.float32),
                              IndexSpec(kind=kind), {"e": 1})
    q = uniform(3, seed=8)
    assert index.search(q, 5) == [[], [], []]
    assert index.search(q, 5, allowed_ids=np.array([1, 2])) == [[], [], []]
    assert index.ids().size == 0
    index.save(tmp_path)
    loaded = VectorIndex.load(tmp_path)
    assert loaded is not None and loaded.ntotal == 0 and loaded.search(q, 5) == [[], [], []]
    assert loaded.meta == {"e": 1}


def test_build_validation() -> None:
    x = uniform(10, seed=9)
    ids = np.arange(10, dtype=np.int64)
    bad = [
        (ids, x.astype(np.float64)),  # wrong vector dtype
        (ids, x[0]),  # 1-D vectors
        (ids[:9], x),  # one id short
        (ids.reshape(2, 5), x),  # 2-D ids
        (ids.astype(np.float32), x),  # float ids
        (np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 8]), x),  # duplicate id
        (np.array([-1, 1, 2, 3, 4, 5, 6, 7, 8, 9]), x),  # -1 is faiss's "no result"
        (ids, np.where(np.arange(DIM) == 3, np.nan, x).astype(np.float32)),  # NaN
        (ids.tolist(), x),  # not an array
    ]
    for bad_ids, bad_x in bad:
        with pytest.raises(ValidationError) as info:
            VectorIndex.build(bad_ids, bad_x, IndexSpec(), {})
        assert str(info.value).endswith(".")
    with pytest.raises(ValidationError):
        VectorIndex.build(ids, x, IndexSpec(), {"not json": object()})
    with pytest.raises(ValidationError):
        IndexSpec(kind="lsh")
    with pytest.raises(ValidationError):
        IndexSpec(hnsw_m=0)
    assert issubclass(ValidationError, KvdbError)


def test_search_validation(built) -> None:
    index = built["flat"]
    good = uniform(2, seed=10)
    for queries in (good.astype(np.float64), good[0], uniform(2, seed=10, dim=DIM + 1), good.tolist()):
        with pytest.raises(ValidationError):
            index.search(queries, 3)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValidationError):
            index.search(good, k)
    assert index.search(np.empty((0, DIM), dtype=np.float32), 3) == []


# ----- remove_ids ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_remove_ids(data, kind) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids[:1500], x[:1500], IndexSpec(kind=kind, ivf_nlist=20), {})
    assert index.kind == kind
    gone = ids[:1500:3]
    assert index.remove_ids(np.concatenate([gone, np.array([5, 6])])) == gone.size  # absent ids ignored
    assert index.remove_ids(gone) == 0
    kept = np.setdiff1d(ids[:1500], gone)
    assert index.ids().tolist() == kept.tolist()
    gone_set = set(gone.tolist())
    rows = index.search(x[:30], 10)
    assert all(i not in gone_set for row in rows for i, _ in row)
    # A removed vector no longer finds itself; a kept one still does.
    assert rows[0][0][0] != ids[0] and rows[1][0][0] == ids[1]
    filtered = index.search(q[:5], 10, allowed_ids=ids[:1500])
    assert all(len(r) == 10 and i not in gone_set for r in filtered for i, _ in r)


# ----- persistence -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip(tmp_path: Path, built, data, kind) -> None:
    ids, _, q = data
    index = built[kind]
    index.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FAISS_FILE, META_FILE]  # no temp files left behind
    loaded = VectorIndex.load(tmp_path)
    assert loaded is not None
    assert loaded.kind == kind and loaded.dim == DIM and loaded.spec == index.spec
    assert loaded.meta == {"kind": kind}
    assert loaded.ids().tolist() == index.ids().tolist()
    assert loaded.search(q, 10) == index.search(q, 10)
    allowed = ids[::4]
    assert loaded.search(q, 10, allowed_ids=allowed) == index.search(q, 10, allowed_ids=allowed)
    doc = json.loads((tmp_path / META_FILE).read_text())
    assert doc["ntotal"] == ids.size and doc["dim"] == DIM and len(doc["faiss_sha256"]) == 64
    assert doc["faiss_bytes"] == (tmp_path / FAISS_FILE).stat().st_size


def test_save_overwrites_and_meta_is_a_copy(tmp_path: Path) -> None:
    x = uniform(50, seed=11)
    meta = {"embedder": "minilm", "revision": 3}
    first = VectorIndex.build(np.arange(50, dtype=np.int64), x, IndexSpec(kind="flat"), meta)
    meta["revision"] = 99
    first.meta["revision"] = 100
    assert first.meta == {"embedder": "minilm", "revision": 3}
    first.save(tmp_path)
    second = VectorIndex.build(np.arange(100, 110, dtype=np.int64), x[:10], IndexSpec(kind="flat"), {"revision": 4})
    second.save(tmp_path)
    loaded = VectorIndex.load(tmp_path)
    assert loaded.meta == {"revision": 4} and loaded.ids().tolist() == list(range(100, 110))
    assert sorted(p.name for p in tmp_path.iterdir()) == [FAISS_FILE, META_FILE]


def test_failed_save_leaves_previous_files_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    x = uniform(20, seed=12)
    VectorIndex.build(np.arange(20, dtype=np.int64), x, IndexSpec(kind="flat"), {"v": 1}).save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        VectorIndex.build(np.arange(5, dtype=np.int64), x[:5], IndexSpec(kind="flat"), {"v": 2}).save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    assert VectorIndex.load(tmp_path).meta == {"v": 1}


def test_load_of_missing_or_empty_directory_returns_none(tmp_path: Path) -> None:
    assert VectorIndex.load(tmp_path) is None
    assert VectorIndex.load(tmp_path / "never-created") is None


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    x = uniform(500, seed=13)
    VectorIndex.build(np.arange(500, dtype=np.int64), x, IndexSpec(kind="flat"), {"m": 1}).save(tmp_path)
    return tmp_path


def corrupt_truncate(d: Path) -> str:
    raw = (d / FAISS_FILE).read_bytes()
    (d / FAISS_FILE).write_bytes(raw[: len(raw) // 2])
    return FAISS_FILE


def corrupt_flip_byte(d: Path) -> str:
    raw = bytearray((d / FAISS_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (d / FAISS_FILE).write_bytes(bytes(raw))
    return FAISS_FILE


def corrupt_malformed_json(d: Path) -> str:
    (d / META_FILE).write_text('{"format": "kvdb-faiss-index", "version": 1,')
    return META_FILE


def corrupt_missing_faiss(d: Path) -> str:
    (d / FAISS_FILE).unlink()
    return FAISS_FILE


def corrupt_missing_json(d: Path) -> str:
    (d / META_FILE).unlink()
    return META_FILE


def corrupt_ntotal(d: Path) -> str:
    doc = json.loads((d / META_FILE).read_text())
    doc["ntotal"] += 1
    (d / META_FILE).write_text(json.dumps(doc))
    return FAISS_FILE


def corrupt_dim(d: Path) -> str:
    doc = json.loads((d / META_FILE).read_text())
    doc["dim"] = 32
    (d / META_FILE).write_text(json.dumps(doc))
    return FAISS_FILE


def corrupt_garbage_with_matching_checksum(d: Path) -> str:
    # A file that passes the size and checksum test yet is not a faiss index must still fail cleanly.
    import hashlib

    garbage = b"\x00" * 64
    (d / FAISS_FILE).write_bytes(garbage)
    doc = json.loads((d / META_FILE).read_text())
    doc["faiss_bytes"], doc["faiss_sha256"] = len(garbage), hashlib.sha256(garbage).hexdigest()
    (d / META_FILE).write_text(json.dumps(doc))
    return FAISS_FILE


def corrupt_json_wrong_shape(d: Path) -> str:
    (d / META_FILE).write_text(json.dumps({"format": "kvdb-faiss-index", "version": 1, "kind": "flat"}))
    return META_FILE


def corrupt_crash_between_renames(d: Path) -> str:
    # A newer save replaced index.faiss and died before index.json: the old json's checksum no longer matches.
    x = uniform(40, seed=14)
    other = d / "other"
    VectorIndex.build(np.arange(40, dtype=np.int64), x, IndexSpec(kind="flat"), {}).save(other)
    (other / FAISS_FILE).replace(d / FAISS_FILE)
    for p in other.iterdir():
        p.unlink()
    other.rmdir()
    return FAISS_FILE


@pytest.mark.parametrize("damage", [
    corrupt_truncate, corrupt_flip_byte, corrupt_malformed_json, corrupt_missing_faiss, corrupt_missing_json,
    corrupt_ntotal, corrupt_dim, corrupt_garbage_with_matching_checksum, corrupt_json_wrong_shape,
    corrupt_crash_between_renames,
])
def test_damaged_index_raises_index_corrupt(saved: Path, damage) -> None:
    named = damage(saved)
    with pytest.raises(IndexCorruptError) as info:
        VectorIndex.load(saved)
    message = str(info.value)
    assert named in message and "rebuilt" in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


# ----- threads ---------------------------------------------------------------------------------------------------


def test_concurrent_search_and_remove(data) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids[:2000], x[:2000], IndexSpec(kind="flat"), {})
    errors: list[BaseException] = []
    removed = ids[:2000:2]

    def searcher() -> None:
        try:
            for _ in range(30):
                for row in index.search(q[:8], 10, allowed_ids=ids[:2000]):
                    assert len(row) == 10 and all(i >= 0 for i, _ in row)
        except BaseException as exc:  # reported below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for chunk in np.array_split(removed, 10):
        index.remove_ids(chunk)
    for t in threads:
        t.join()
    assert not errors
    assert index.ntotal == 1000
