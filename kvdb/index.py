"""FAISS vector index over the caller's int64 ids: build whole, search with an optional id filter, persist atomically.

The index knows nothing about the database. It maps ids to float32 vectors that the caller has L2-normalised and
ranks by inner product, i.e. cosine similarity. ``save`` writes ``index.faiss`` and then ``index.json`` (which
records the sha256 of the faiss bytes), each through a temporary file and a rename, so a crash leaves either the
previous pair or a pair whose checksum disagrees; ``load`` refuses the latter with ``IndexCorruptError`` and the
caller rebuilds from the store.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np

from kvdb.errors import IndexCorruptError, ValidationError
from kvdb.fileio import atomic_path, atomic_write_bytes
from kvdb.uptodate import FAISS_FILE, META_FILE

log = logging.getLogger(__name__)

FORMAT = "kvdb-faiss-index"
FORMAT_VERSION = 1

KINDS = ("flat", "flat16", "hnsw", "ivf", "auto")
BUILT_KINDS = ("flat", "flat16", "hnsw", "ivf")

# k-means with fewer points per centroid than this gives lists too uneven to be worth probing; below it IVF
# falls back to flat (which, at that size, is fast anyway). It also silences faiss's own stderr warning.
_IVF_MIN_POINTS_PER_CENTROID = 10
# k-means cost grows with training points x nlist. faiss's default of 256 points per centroid would train on all
# of a 1M-vector index at nlist 4000; a quarter of that trains 4x faster, and recall@10 at nprobe 32 was still
# 0.997-0.9995 in benchmarks/bench_retrieval.py at 1M.
_IVF_MAX_TRAIN_POINTS_PER_CENTROID = 64
# At or below this many allowed ids an exact scan of just those vectors is both cheaper than a filtered graph or
# list search and exact, so the selector is not used at all (the usual case for a domain filter).
_EXACT_FILTER_MAX = 2048
# Vectors reconstructed per step of an exact scan: bounds its memory to about 25 MB at dim 384.
_RECONSTRUCT_CHUNK = 16384
# Streamed reads and writes of the faiss file go through Python in pieces of this size.
_IO_CHUNK = 1 << 20


@dataclass(frozen=True)
class IndexSpec:
    """How to build the index; ``auto`` is flat up to ``auto_exact_max`` vectors, flat over fp16 copies of the
    vectors (``flat16``) up to ``auto_flat_max`` and HNSW above it.

    ``flat16`` scans half the bytes of ``flat`` (one query over 200k x 384 vectors, 1 thread: 6.6 ms instead of 14.5
    ms) for cosines within about 1e-3 of the exact ones; HNSW is faster still but its build costs about a minute at
    200k vectors, paid again at the first query after each change of the store.

    Defaults were tuned with benchmarks/bench_retrieval.py at 1M x 384 on 2 cores: HNSW efSearch 256 over a graph
    built with efConstruction 80 gave recall@10 0.986-0.993 (two builds) at about 1.2 ms a query, where efSearch
    128 gave 0.958; IVF with nlist 4*sqrt(n) = 4000 and nprobe 32 gave 0.997-0.9995 at about 0.9 ms.
    """

    kind: str = "auto"
    hnsw_m: int = 32
    hnsw_ef_search: int = 256
    hnsw_ef_construction: int = 80
    ivf_nlist: int | None = None
    ivf_nprobe: int = 32
    auto_exact_max: int = 50_000
    auto_flat_max: int = 200_000

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValidationError(f"Index kind {self.kind!r} is not one of {', '.join(KINDS)}.")
        for name in ("hnsw_m", "hnsw_ef_search", "hnsw_ef_construction", "ivf_nprobe"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValidationError(f"Index option {name} must be a positive integer, not {value!r}.")
        if self.hnsw_m < 2:
            raise ValidationError(f"Index option hnsw_m must be at least 2, not {self.hnsw_m}.")
        if self.ivf_nlist is not None and (not _is_int(self.ivf_nlist) or self.ivf_nlist < 1):
            raise ValidationError(f"Index option ivf_nlist must be a positive integer or None, not {self.ivf_nlist!r}.")
        for name in ("auto_exact_max", "auto_flat_max"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValidationError(f"Index option {name} must be a non-negative integer, not {value!r}.")

    def resolve(self, n: int) -> tuple[str, int]:
        """The kind actually built for ``n`` vectors and, for IVF, its nlist (0 otherwise)."""
        kind = self.kind
        if kind == "auto":
            kind = "hnsw" if n > self.auto_flat_max else "flat16" if n > self.auto_exact_max else "flat"
        if n == 0:
            return "flat", 0
        if kind == "ivf":
            nlist = self.ivf_nlist if self.ivf_nlist is not None else max(1, round(4 * math.sqrt(n)))
            if n < nlist * _IVF_MIN_POINTS_PER_CENTROID:
                return "flat", 0
            return "ivf", nlist
        return kind, 0


class VectorIndex:
    """A built FAISS index with the caller's ids; construct with ``build`` or ``load``.

    One lock serialises searches, removals and saves: faiss already spreads a batch of queries over its threads,
    and a search must never see an index half-way through ``remove_ids``.
    """

    def __init__(self, index: faiss.Index, kind: str, spec: IndexSpec, dim: int, meta: dict[str, Any],
                 ids: np.ndarray) -> None:
        self._index = index
        self._kind = kind
        self._spec = spec
        self._dim = dim
        self._meta = meta
        self._ids = ids  # sorted, unique; lets a filter be intersected without touching faiss
        self._lock = threading.Lock()

    # ----- construction ---------------------------------------------------------------------------------------

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, spec: IndexSpec | None = None,
              meta: dict[str, Any] | None = None) -> VectorIndex:
        """Index ``vectors`` (n, d) float32 under ``ids`` (n,) int64; an empty (0, d) input gives an empty index."""
        spec = IndexSpec() if spec is None else spec
        if not isinstance(spec, IndexSpec):
            raise ValidationError(f"The index spec must be an IndexSpec, not {type(spec).__name__}.")
        meta = _check_meta({} if meta is None else meta)
        x = _check_vectors(vectors)
        id_arr = _check_ids(ids, x.shape[0])
        kind, nlist = spec.resolve(x.shape[0])
        index = _make_index(kind, nlist, spec, x, id_arr)
        return cls(index, kind, spec, x.shape[1], meta, np.sort(id_arr))

    # ----- read-only views ------------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The kind actually built: ``flat``, ``flat16``, ``hnsw`` or ``ivf`` (``auto`` and too-small IVF are
        resolved)."""
        return self._kind

    @property
    def spec(self) -> IndexSpec:
        return self._spec

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return int(self._ids.size)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def meta(self) -> dict[str, Any]:
        """The caller's metadata (a copy, so editing it cannot desynchronise a later ``save``)."""
        return copy.deepcopy(self._meta)

    def ids(self) -> np.ndarray:
        """The ids present, sorted ascending, as int64."""
        with self._lock:
            return self._ids.copy()

    def __repr__(self) -> str:
        return f"VectorIndex(kind={self._kind!r}, ntotal={self.ntotal}, dim={self._dim})"

    # ----- search ---------------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int,
               allowed_ids: np.ndarray | None = None) -> list[list[tuple[int, float]]]:
        """For each query row, up to ``k`` (id, cosine) pairs, best first, restricted to ``allowed_ids`` if given."""
        q = _check_queries(queries, self._dim)
        if not _is_int(k) or k < 1:
            raise ValidationError(f"The number of results k must be a positive integer, not {k!r}.")
        m = q.shape[0]
        with self._lock:
            if m == 0 or self._ids.size == 0:
                return [[] for _ in range(m)]
            if allowed_ids is None:
                kk = min(k, int(self._ids.size))
                with _threads_for(m):
                    distances, labels = self._index.search(q, kk, params=self._params(None))
                return _to_results(distances, labels)
            subset = self._present(allowed_ids)
            if subset.size == 0:
                return [[] for _ in range(m)]
            kk = min(k, int(subset.size))
            if subset.size <= _EXACT_FILTER_MAX:
                return self._exact(q, subset, kk)
            selector = faiss.IDSelectorBatch(subset)
            with _threads_for(m):
                distances, labels = self._index.search(q, kk, params=self._params(selector))
            results = _to_results(distances, labels)
            # HNSW stops after efSearch candidates and IVF only looks in nprobe lists, so a selective filter can
            # leave a query short of k even though enough allowed vectors exist: answer those exactly.
            short = [i for i, row in enumerate(results) if len(row) < kk]
            if short:
                for i, row in zip(short, self._exact(q[short], subset, kk)):
                    results[i] = row
            return results

    def _params(self, selector: faiss.IDSelector | None) -> faiss.SearchParameters | None:
        # Search-time knobs travel in per-call parameters rather than being set on the shared index.
        if self._kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=self._spec.hnsw_ef_search, sel=selector)
        if self._kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=min(self._spec.ivf_nprobe, self._index.nlist), sel=selector)
        return None if selector is None else faiss.SearchParameters(sel=selector)

    def _present(self, allowed_ids: np.ndarray) -> np.ndarray:
        allowed = np.asarray(allowed_ids)
        if allowed.ndim != 1 or (allowed.size and allowed.dtype.kind not in "iu"):
            raise ValidationError("allowed_ids must be a one-dimensional array of integer ids.")
        allowed = np.unique(allowed.astype(np.int64, copy=False))
        pos = np.searchsorted(self._ids, allowed)
        inside = pos < self._ids.size
        found = np.zeros(allowed.size, dtype=bool)
        found[inside] = self._ids[pos[inside]] == allowed[inside]
        return allowed[found]

    def _exact(self, q: np.ndarray, subset: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """Exact top-k over just ``subset`` (ids known to be present), reconstructing their vectors in chunks."""
        m = q.shape[0]
        best_scores = np.empty((m, 0), dtype=np.float32)
        best_ids = np.empty((m, 0), dtype=np.int64)
        for start in range(0, subset.size, _RECONSTRUCT_CHUNK):
            chunk = subset[start:start + _RECONSTRUCT_CHUNK]
            scores = q @ self._index.reconstruct_batch(chunk).T
            cand_scores = np.concatenate([best_scores, scores], axis=1)
            cand_ids = np.concatenate([best_ids, np.broadcast_to(chunk, scores.shape)], axis=1)
            if cand_scores.shape[1] > k:
                keep = np.argpartition(-cand_scores, k - 1, axis=1)[:, :k]
                cand_scores = np.take_along_axis(cand_scores, keep, axis=1)
                cand_ids = np.take_along_axis(cand_ids, keep, axis=1)
            best_scores, best_ids = cand_scores, cand_ids
        order = np.argsort(-best_scores, axis=1, kind="stable")
        return _to_results(np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_ids, order, axis=1))

    # ----- mutation -------------------------------------------------------------------------------------------

    def remove_ids(self, ids: np.ndarray) -> int:
        """Remove the given ids (absent ones are ignored) and return how many were removed.

        Flat and IVF remove in place; an HNSW graph cannot drop nodes, so it is rebuilt from the remaining vectors.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValidationError("The ids to remove must be a one-dimensional array of integer ids.")
        with self._lock:
            doomed = self._present(arr)
            if doomed.size == 0:
                return 0
            keep = np.setdiff1d(self._ids, doomed, assume_unique=True)
            if self._kind == "hnsw":
                vectors = np.empty((keep.size, self._dim), dtype=np.float32)
                for start in range(0, keep.size, _RECONSTRUCT_CHUNK):
                    chunk = keep[start:start + _RECONSTRUCT_CHUNK]
                    vectors[start:start + chunk.size] = self._index.reconstruct_batch(chunk)
                self._index = _make_index("hnsw", 0, self._spec, vectors, keep)
            elif self._kind == "ivf":
                # The IVF direct map is a hashtable, which faiss can only update through an IDSelectorArray.
                self._index.remove_ids(faiss.IDSelectorArray(doomed))
            else:
                self._index.remove_ids(faiss.IDSelectorBatch(doomed))
            self._ids = keep
            return int(doomed.size)

    # ----- persistence ----------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write ``index.faiss`` then ``index.json`` atomically (temp file, fsync, rename, fsync directory).

        A failed write (disk full, read-only directory) raises the ``OSError`` and leaves the previous files as they
        were; callers may keep using the index in memory.
        """
        directory = Path(directory)
        with self._lock:
            # The faiss bytes are streamed to disk and hashed in the same callback, so the checksum covers exactly
            # what is written without holding a second serialised copy of a large index in memory.
            digest = hashlib.sha256()
            size = 0

            def write_faiss(f: IO[bytes]) -> None:
                nonlocal size

                def sink(chunk: bytes) -> int:
                    nonlocal size
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    return len(chunk)

                writer = faiss.PyCallbackIOWriter(sink, _IO_CHUNK)
                faiss.write_index(self._index, writer)
                del writer

            directory.mkdir(parents=True, exist_ok=True)
            with atomic_path(directory / FAISS_FILE) as tmp, open(tmp, "wb") as f:
                write_faiss(f)
            doc = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "kind": self._kind,
                "spec": dataclasses.asdict(self._spec),
                "ntotal": self.ntotal,
                "dim": self._dim,
                "faiss_bytes": size,
                "faiss_sha256": digest.hexdigest(),
                "meta": self._meta,
            }
            text = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")
            atomic_write_bytes(directory / META_FILE, text)
            log.debug("saved a %s index of %d vectors to %s", self._kind, self.ntotal, directory)

    @classmethod
    def load(cls, directory: Path) -> VectorIndex | None:
        """Read an index saved by ``save``; ``None`` if neither file exists, ``IndexCorruptError`` if it fails a check."""
        directory = Path(directory)
        faiss_path, json_path = directory / FAISS_FILE, directory / META_FILE
        if not faiss_path.exists() and not json_path.exists():
            return None
        # Tries again when a concurrent save replaced a file between our reads; a real mismatch repeats.
        for attempt in range(3):
            json_bytes = _read_json_bytes(json_path, faiss_path)
            doc = _parse_doc(json_bytes, json_path)
            try:
                f = open(faiss_path, "rb")
            except FileNotFoundError:
                raise IndexCorruptError(
                    f"Index file {faiss_path} is missing although {json_path} exists; it will be rebuilt."
                ) from None
            except OSError as exc:
                raise IndexCorruptError(f"Index file {faiss_path} cannot be read ({exc}); it will be rebuilt.") from exc
            with f:
                problem = _check_faiss_file(f, doc)
                if problem is not None:
                    if attempt < 2 and _json_changed(json_path, json_bytes):
                        continue
                    raise IndexCorruptError(f"Index file {faiss_path} {problem}; it will be rebuilt.")
                f.seek(0)
                try:
                    reader = faiss.PyCallbackIOReader(f.read, _IO_CHUNK)
                    index = faiss.read_index(reader)
                    del reader
                except (RuntimeError, MemoryError, ValueError, OSError) as exc:
                    raise IndexCorruptError(
                        f"Index file {faiss_path} cannot be decoded by faiss; it will be rebuilt."
                    ) from exc
            return cls._from_loaded(index, doc, faiss_path)
        raise AssertionError("unreachable")  # pragma: no cover

    @classmethod
    def _from_loaded(cls, index: faiss.Index, doc: dict[str, Any], faiss_path: Path) -> VectorIndex:
        kind = doc["kind"]
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
        expected = {"flat": faiss.IndexFlat, "flat16": faiss.IndexScalarQuantizer, "hnsw": faiss.IndexHNSWFlat,
                    "ivf": faiss.IndexIVFFlat}[kind]
        # IVF stores the caller's ids itself; the other kinds carry them in an IDMap2 (see _make_index).
        wrapped = (kind == "ivf") != isinstance(index, faiss.IndexIDMap2)
        if not (wrapped and isinstance(inner, expected) and index.metric_type == faiss.METRIC_INNER_PRODUCT):
            raise IndexCorruptError(
                f"Index file {faiss_path} holds a {type(inner).__name__}, not the {kind} index its "
                f"{META_FILE} describes; it will be rebuilt."
            )
        if index.ntotal != doc["ntotal"] or index.d != doc["dim"]:
            raise IndexCorruptError(
                f"Index file {faiss_path} holds {index.ntotal} vectors of dimension {index.d} but {META_FILE} says "
                f"{doc['ntotal']} of dimension {doc['dim']}; it will be rebuilt."
            )
        if kind == "ivf":
            if index.direct_map.type != faiss.DirectMap.Hashtable:
                index.set_direct_map_type(faiss.DirectMap.Hashtable)
            ids = _ivf_ids(index)
        else:
            ids = faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
        ids = np.sort(ids)
        if ids.size != index.ntotal or (ids.size > 1 and bool((ids[1:] == ids[:-1]).any())):
            raise IndexCorruptError(f"Index file {faiss_path} has a damaged id map; it will be rebuilt.")
        return cls(index, kind, doc["spec"], int(doc["dim"]), doc["meta"], ids)


# ----- helpers ------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_meta(meta: object) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise ValidationError(f"Index metadata must be a dict, not {type(meta).__name__}.")
    try:
        # A JSON round trip both proves it can be saved and detaches it from the caller's objects.
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"Index metadata must be JSON-serialisable ({exc}).") from exc


def _check_vectors(vectors: object) -> np.ndarray:
    if not isinstance(vectors, np.ndarray):
        raise ValidationError(f"Vectors must be a numpy array, not {type(vectors).__name__}.")
    if vectors.ndim != 2:
        raise ValidationError(f"Vectors must be a 2-D array (n, dim), not one of shape {vectors.shape}.")
    if vectors.shape[1] < 1:
        raise ValidationError("Vectors must have a dimension of at least 1.")
    if vectors.dtype != np.float32:
        raise ValidationError(f"Vectors must be float32, not {vectors.dtype}.")
    # Row sums are NaN or inf whenever any element is, at a fraction of the memory of np.isfinite on the matrix.
    if vectors.size and not np.isfinite(vectors.sum(axis=1, dtype=np.float64)).all():
        raise ValidationError("Vectors contain NaN or infinite values.")
    return np.ascontiguousarray(vectors)


def _check_ids(ids: object, n: int) -> np.ndarray:
    if not isinstance(ids, np.ndarray):
        raise ValidationError(f"Ids must be a numpy array, not {type(ids).__name__}.")
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValidationError(f"Ids must be a 1-D array with one id per vector ({n}), not one of shape {ids.shape}.")
    if n and ids.dtype.kind not in "iu":
        raise ValidationError(f"Ids must be integers (int64), not {ids.dtype}.")
    if ids.dtype.kind == "u" and n and ids.max() > np.iinfo(np.int64).max:
        raise ValidationError("Ids must fit in int64.")
    arr = np.ascontiguousarray(ids, dtype=np.int64)
    if n and arr.min() < 0:
        # faiss marks a missing result with -1, so negative ids would be indistinguishable from no result.
        raise ValidationError("Ids must be non-negative.")
    if n > 1:
        s = np.sort(arr)
        dup = s[1:] == s[:-1]
        if dup.any():
            raise ValidationError(f"Ids must be unique; {int(s[1:][dup][0])} appears more than once.")
    return arr


def _check_queries(queries: object, dim: int) -> np.ndarray:
    if not isinstance(queries, np.ndarray):
        raise ValidationError(f"Queries must be a numpy array, not {type(queries).__name__}.")
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValidationError(f"Queries must be a 2-D array (m, {dim}), not one of shape {queries.shape}.")
    if queries.dtype != np.float32:
        raise ValidationError(f"Queries must be float32, not {queries.dtype}.")
    return np.ascontiguousarray(queries)


def _make_index(kind: str, nlist: int, spec: IndexSpec, x: np.ndarray, ids: np.ndarray) -> faiss.Index:
    d = x.shape[1]
    if kind == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        # The IVF index takes ownership so the quantizer lives exactly as long as it (also after a load).
        quantizer.this.disown()
        index.own_fields = True
        index.cp.min_points_per_centroid = _IVF_MIN_POINTS_PER_CENTROID
        index.cp.max_points_per_centroid = _IVF_MAX_TRAIN_POINTS_PER_CENTROID
        index.train(x)
        index.nprobe = min(spec.ivf_nprobe, nlist)
        # IVF stores the caller's ids itself; an IDMap around it would break on remove_ids, because IVF does not
        # renumber its internal ids the way IDMap assumes. The hashtable direct map is what makes reconstruct
        # (exact filtered search) and remove_ids work by external id.
        index.add_with_ids(x, ids)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = spec.hnsw_ef_construction
        inner.hnsw.efSearch = spec.hnsw_ef_search
    elif kind == "flat16":
        inner = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:
        inner = faiss.IndexFlatIP(d)
    index = faiss.IndexIDMap2(inner)
    inner.this.disown()
    index.own_fields = True
    if x.shape[0]:
        index.add_with_ids(x, ids)
    return index


@contextmanager
def _threads_for(queries: int) -> Iterator[None]:
    """Run faiss on one OpenMP thread while searching a single query.

    faiss spreads a batch over threads query by query, so one query gains nothing from a parallel region, yet HNSW
    still opens one: when other processes hold the cores its barrier waits out a scheduler slice (measured: 16 ms
    instead of 0.7 ms at 50k vectors). The setting is per calling thread, so other threads are unaffected.
    """
    if queries > 1:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _to_results(distances: np.ndarray, labels: np.ndarray) -> list[list[tuple[int, float]]]:
    return [
        [(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
        for row_ids, row_scores in zip(labels, distances)
    ]


def _ivf_ids(index: faiss.IndexIVF) -> np.ndarray:
    invlists = index.invlists
    parts = []
    for list_no in range(index.nlist):
        size = invlists.list_size(list_no)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.empty(0, dtype=np.int64)


def _read_json_bytes(json_path: Path, faiss_path: Path) -> bytes:
    try:
        return json_path.read_bytes()
    except FileNotFoundError:
        raise IndexCorruptError(
            f"Index metadata {json_path} is missing although {faiss_path} exists; the index will be rebuilt."
        ) from None
    except OSError as exc:
        raise IndexCorruptError(f"Index metadata {json_path} cannot be read ({exc}); the index will be rebuilt.") from exc


def _json_changed(json_path: Path, seen: bytes) -> bool:
    try:
        return json_path.read_bytes() != seen
    except OSError:
        return False


def _parse_doc(raw: bytes, json_path: Path) -> dict[str, Any]:
    def bad(why: str) -> IndexCorruptError:
        return IndexCorruptError(f"Index metadata {json_path} {why}; the index will be rebuilt.")

    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad("is not a kvdb index description")
    if doc.get("version") != FORMAT_VERSION:
        raise bad(f"has format version {doc.get('version')!r}, not {FORMAT_VERSION}")
    if doc.get("kind") not in BUILT_KINDS:
        raise bad(f"names an unknown index kind {doc.get('kind')!r}")
    for key, low in (("ntotal", 0), ("dim", 1), ("faiss_bytes", 0)):
        if not _is_int(doc.get(key)) or doc[key] < low:
            raise bad(f"has no valid {key}")
    sha = doc.get("faiss_sha256")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise bad("has no valid faiss_sha256")
    if not isinstance(doc.get("meta"), dict):
        raise bad("has no meta object")
    spec = doc.get("spec")
    try:
        if not isinstance(spec, dict):
            raise TypeError
        doc["spec"] = IndexSpec(**spec)
    except (TypeError, ValidationError):
        raise bad("has no valid spec") from None
    return doc


def _check_faiss_file(f: IO[bytes], doc: dict[str, Any]) -> str | None:
    """Why the open faiss file disagrees with its description, or None if size and sha256 match."""
    size = os.fstat(f.fileno()).st_size
    if size < doc["faiss_bytes"]:
        return f"is truncated ({size} of {doc['faiss_bytes']} bytes)"
    if size > doc["faiss_bytes"]:
        return f"is longer than recorded ({size} instead of {doc['faiss_bytes']} bytes)"
    digest = hashlib.sha256()
    while chunk := f.read(_IO_CHUNK):
        digest.update(chunk)
    if digest.hexdigest() != doc["faiss_sha256"]:
        return "does not match the checksum in its index.json"
    return None
