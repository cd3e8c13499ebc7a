"""`kvdb export` / `kvdb import`: the `.pth` knowledge caches the seed's trainer read, as a portable file.

A cache is a dict that ``torch.load(path, weights_only=True)`` opens::

    format "kvdb.knowledge_cache", version 1, domain ("all" or a name),
    model {name, fingerprint, hidden_size, num_layers, layers},  embedder {key, dim, fields},
    qa_pairs [{hash, domain, question, answer, metadata}],
    token_ids [int32 [T]], token_vectors [{"layer_<L>": fp16 [T, H]}], answer_starts [int],
    embeddings [float32 [D] (question)], embedding_fields [{field: float32 [n, D]}],
    base_answers [{} or {prompt_format, max_new_tokens, finished, text, prompt_ids int32 [P],
                   output_ids int32 [n], "layer_<L>": fp16 [n, H]}]   (optional: caches before it lack the list)
    variant_answers [[{prompt_format, key, max_new_tokens, finished, output_ids int32 [n]}]]   (optional, as above)

Lists are parallel, one entry per pair, in store order. ``base_answers`` carries the base model's recorded answer
to each pair's own question (what `kvdb train` records, with the states the draft attends to), so a deployment
from the cache alone replays a stored question's answer and drafts as the store would.

Writing streams pair by pair: a pickler writes each tensor's storage into the zip archive as soon as it meets it
and forgets it, so memory stays bounded by one pair however large the store is. Archives carry no timestamps or temporary names, so the same store gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pickle import APPEND, EMPTY_LIST, UnpicklingError, _Pickler  # writing only; reads use weights_only
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import insert, select

from kvdb.config import Config, Home
from kvdb.errors import CorruptError, ForeignFileError, NotBuiltError, NotFoundError, StoreError, ValidationError
from kvdb.fileio import atomic_path, write_error
from kvdb.store.blobs import unpack
from kvdb.store.db import Store
from kvdb.prompt import PROMPT_FORMAT
from kvdb.recorded import Recording, merge_recordings, recordings_by_pair
from kvdb.store.basemodels import ensure_model
from kvdb.store.models import BaseAnswer, Domain, Embedding, ModelInfo, Pair, PairVectors
from kvdb.store.pairs import check_domain, domain_id

FORMAT = "kvdb.knowledge_cache"
VERSION = 1
_LIST_KEYS = ("qa_pairs", "token_ids", "token_vectors", "answer_starts", "embeddings", "embedding_fields")
_OPTIONAL_LIST_KEYS = ("base_answers", "variant_answers")


# -- streaming .pth writer ----------------------------------------------------------------------------------------
class _Stream:
    """A list whose items are produced while pickling; unpickles as a plain list."""

    def __init__(self, items: Iterator[Any]):
        self.items = items


class _StreamingPickler(_Pickler):  # the pure-Python pickler: its dispatch and memo can be extended
    dispatch = dict(_Pickler.dispatch)

    def __init__(self, file, archive):
        super().__init__(file, protocol=2)
        self.archive = archive
        self._storage_keys: dict[int, str] = {}  # storage address -> record key, for storages still alive
        self._next_key = 0
        self._next_memo = 0

    def memoize(self, obj):
        # A counter rather than len(memo): entries are dropped after each streamed item (so tensors can be freed),
        # and indices must never be handed out twice.
        if self.fast:
            return
        idx = self._next_memo
        self._next_memo += 1
        self.write(self.put(idx))
        self.memo[id(obj)] = idx, obj

    def persistent_id(self, obj):
        # Mirrors torch.serialization._save, except that the storage bytes go into the archive right away.
        if isinstance(obj, torch.storage.TypedStorage):
            storage = obj._untyped_storage
            key = self._storage_keys.get(storage._cdata)
            if key is None:
                key = str(self._next_key)
                self._next_key += 1
                self._storage_keys[storage._cdata] = key
                self.archive.write_record(f"data/{key}", storage, storage.nbytes())
            return ("storage", getattr(torch, obj._pickle_storage_type()), key, "cpu", obj._size())
        return None

    def save_stream(self, obj: _Stream) -> None:
        self.write(EMPTY_LIST)
        self.memoize(obj)
        for item in obj.items:
            before = len(self.memo)
            self.save(item)
            self.write(APPEND)
            for key in list(self.memo)[before:]:
                del self.memo[key]  # the item's tensors and storages are written; let them go
            # Freed storages' addresses get reused: a stale entry would alias a later tensor to this one's bytes.
            self._storage_keys.clear()

    dispatch[_Stream] = save_stream


def write_pth_streaming(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` (which may hold ``_Stream`` lists) as a torch zip archive, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        archive = torch._C.PyTorchFileWriter(f, True, 64)
        try:
            data = io.BytesIO()
            _StreamingPickler(data, archive).dump(obj)
            payload = data.getvalue()
            archive.write_record("data.pkl", payload, len(payload))
            archive.write_record(".format_version", "1", 1)
            archive.write_record(".storage_alignment", "64", 2)
            archive.write_record("byteorder", sys.byteorder, len(sys.byteorder))
            # torch stamps archives with a random id unless one is written: derive it from the content instead.
            stamp = hashlib.sha256(payload).hexdigest()[:20]
            archive.write_record(".data/serialization_id", stamp, len(stamp))
            archive.write_end_of_file()
        except BaseException:
            # An unfinished writer finishes the archive in its C++ destructor; if that write fails too (disk full),
            # the destructor throws and the process aborts. Finishing here marks it finished even when it fails.
            try:
                archive.write_end_of_file()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        finally:
            del archive


# -- export -------------------------------------------------------------------------------------------------------
@dataclass
class ExportedFile:
    path: str
    domain: str
    pairs: int


_COLUMNS = {  # what each pass of an export reads: a pass fetches only the blob it writes
    "qa_pairs": (Pair.hash, Domain.name, Pair.question, Pair.answer, Pair.meta),
    "token_ids": (Pair.hash, PairVectors.data, PairVectors.checksum),
    "token_vectors": (Pair.hash, PairVectors.data, PairVectors.checksum),
    "answer_starts": (Pair.hash, PairVectors.answer_start),
    "embeddings": (Pair.hash, Embedding.data, Embedding.checksum),
    "embedding_fields": (Pair.hash, Embedding.data, Embedding.checksum),
    "hashes": (Pair.hash,),
    "base_answers": (Pair.hash, BaseAnswer.data, BaseAnswer.checksum, BaseAnswer.max_new_tokens,
                     BaseAnswer.finished, BaseAnswer.text),
}


def _pair_rows(session, kind: str, fingerprint: str, embedder: str, dom_id: int | None, chunk: int = 256):
    """Yield the ``kind`` columns of every pair that has vectors, in store order, a chunk at a time (plain rows,
    no ORM objects: an export of a large store makes one pass per list, and object loading dominated it)."""
    last = 0
    while True:
        query = (
            select(Pair.id, *_COLUMNS[kind])
            .join(PairVectors, (PairVectors.pair_hash == Pair.hash) & (PairVectors.fingerprint == fingerprint))
            .where(Pair.id > last)
            .order_by(Pair.id)
            .limit(chunk)
        )
        if kind == "qa_pairs":
            query = query.join(Domain, Domain.id == Pair.domain_id)
        if kind in ("embeddings", "embedding_fields"):
            query = query.outerjoin(Embedding, (Embedding.pair_hash == Pair.hash) & (Embedding.embedder == embedder))
        if kind == "base_answers":
            query = query.outerjoin(BaseAnswer, (BaseAnswer.pair_hash == Pair.hash)
                                    & (BaseAnswer.fingerprint == fingerprint)
                                    & (BaseAnswer.prompt_format == PROMPT_FORMAT))
        if dom_id is not None:
            query = query.where(Pair.domain_id == dom_id)
        rows = session.execute(query).all()
        if not rows:
            return
        for row in rows:
            yield row[1:]
        last = rows[-1][0]


def _cache_object(session, model: ModelInfo, layers: list[int], embedder_key: str, embedder_dim: int,
                  domain: str, dom_id: int | None, variants: dict[str, list[Recording]]) -> dict[str, Any]:
    def rows(kind: str):  # a fresh pass each time
        return _pair_rows(session, kind, model.fingerprint, embedder_key, dom_id)

    def pairs():
        for h, domain_name, question, answer, meta in rows("qa_pairs"):
            yield {"hash": h, "domain": domain_name, "question": question, "answer": answer, "metadata": meta or {}}

    def recordings() -> Iterator[dict[str, Any]]:
        for h, data, digest, limit, finished, text in rows("base_answers"):
            try:
                t = unpack(data, digest, f"base answer of pair {h[:12]}") if data is not None else None
            except CorruptError:
                t = None  # a damaged recording is left out, as the store itself would skip it
            if t is None:
                yield {}
                continue
            yield {"prompt_format": PROMPT_FORMAT, "max_new_tokens": int(limit), "finished": bool(finished),
                   "text": text, **{k: v.clone() for k, v in sorted(t.items())}}

    def variant_answers() -> Iterator[list[dict[str, Any]]]:
        for (h,) in rows("hashes"):
            yield [{"prompt_format": PROMPT_FORMAT, "key": r.key, "max_new_tokens": r.max_new_tokens,
                    "finished": r.finished, "output_ids": torch.tensor(r.output, dtype=torch.int32)}
                   for r in variants.get(h, [])]

    def tensors(kind: str) -> Iterator[Any]:
        for h, *cols in rows(kind):
            if kind == "answer_starts":
                yield cols[0]
                continue
            data, digest = cols
            if kind in ("token_ids", "token_vectors"):
                t = unpack(data, digest, f"vectors of pair {h[:12]}")
                if kind == "token_ids":
                    yield t["token_ids"].clone()
                else:
                    yield {k: v.clone() for k, v in sorted(t.items()) if k.startswith("layer_")}
                continue
            if data is None:
                raise NotBuiltError(f"pair {h[:12]} has vectors but no embedding; run `kvdb build`")
            fields = unpack(data, digest, f"embedding of pair {h[:12]}")
            if kind == "embeddings":
                yield fields["question"][0].clone()
            else:
                yield {k: v.clone() for k, v in sorted(fields.items())}

    obj = {
        "format": FORMAT,
        "version": VERSION,
        "domain": domain,
        "model": {"name": model.name, "fingerprint": model.fingerprint, "hidden_size": model.hidden_size,
                  "num_layers": model.num_layers, "layers": list(layers)},
        "embedder": {"key": embedder_key, "dim": embedder_dim},
        "qa_pairs": _Stream(pairs()),
    }
    for key in _LIST_KEYS[1:]:
        obj[key] = _Stream(tensors(key))
    obj["base_answers"] = _Stream(recordings())
    obj["variant_answers"] = _Stream(variant_answers())
    return obj


def export_caches(config: Config, home: Home, store: Store, domain: str = "all", out: Path | None = None,
                  progress: bool = False) -> list[ExportedFile]:
    from kvdb.identity import resolve_embedder
    from kvdb.identity import resolve_model

    ref = resolve_model(config.model, home)
    emb_ref = resolve_embedder(config.embedder, home, ref.fingerprint)
    out = Path(out) if out is not None else home.cache_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the export folder {out}: {exc.strerror}") from None
    if not _writable(out):
        raise StoreError(f"the export folder {out} is not writable")
    written = []
    variants = recordings_by_pair(store, ref.fingerprint)
    with store.read() as session:
        model = session.get(ModelInfo, ref.fingerprint)
        if model is None:
            raise NotBuiltError(f"nothing is built for {ref.name} yet; run `kvdb build` first")
        layer_rows = session.execute(select(PairVectors.layers).where(PairVectors.fingerprint == ref.fingerprint)
                                     .limit(1)).first()
        layers = list(layer_rows[0]) if layer_rows else []
        dim_row = session.execute(select(Embedding.dim).where(Embedding.embedder == emb_ref.key).limit(1)).first()
        dim = int(dim_row[0]) if dim_row else 0
        if domain == "all":
            targets = [("all", None, "knowledge_cache.pth")]
            targets += [(name, did, f"knowledge_cache_{name}.pth")
                        for name, did in session.execute(select(Domain.name, Domain.id).order_by(Domain.name))]
        else:
            check_domain(domain)
            targets = [(domain, domain_id(session, domain), f"knowledge_cache_{domain}.pth")]
        for name, did, filename in targets:
            count = _count_built(session, ref.fingerprint, did)
            obj = _cache_object(session, model, layers, emb_ref.key, dim, name, did, variants)
            try:
                write_pth_streaming(out / filename, obj)
            except OSError as exc:
                raise write_error(out / filename, exc, "the old file, if any, is unchanged") from None
            written.append(ExportedFile(str(out / filename), name, count))
    return written


def _count_built(session, fingerprint: str, dom_id: int | None) -> int:
    from sqlalchemy import func

    query = select(func.count(Pair.id)).join(
        PairVectors, (PairVectors.pair_hash == Pair.hash) & (PairVectors.fingerprint == fingerprint))
    if dom_id is not None:
        query = query.where(Pair.domain_id == dom_id)
    return session.scalar(query) or 0


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK | os.X_OK)


# -- reading ------------------------------------------------------------------------------------------------------
def load_cache(path: str | Path) -> dict[str, Any]:
    """Open a kvdb cache safely (``weights_only``: a pickle that would run code is refused) and check its shape."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"cache file {path} does not exist; run `kvdb export` to write one")
    if not zipfile.is_zipfile(path):  # kvdb writes torch zip archives; an older or raw pickle is never read
        raise ForeignFileError(f"{path} is not a readable kvdb cache (not a complete torch zip archive)")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except UnpicklingError:
        raise ForeignFileError(f"{path} is not a safe kvdb cache (it holds objects that only running code could "
                               "rebuild, which kvdb never loads)") from None
    except Exception as exc:  # zip errors, truncation, anything torch.load raises on a bad file
        raise ForeignFileError(f"{path} is not a readable kvdb cache ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ForeignFileError(f"{path} is not a kvdb knowledge cache (no format '{FORMAT}')")
    if obj.get("version") != VERSION:
        raise ForeignFileError(f"{path} is cache version {obj.get('version')}, this kvdb reads {VERSION}")
    n = len(obj.get("qa_pairs", []))
    for key in _LIST_KEYS + tuple(k for k in _OPTIONAL_LIST_KEYS if k in obj):
        if not isinstance(obj.get(key), list) or len(obj[key]) != n:
            raise ForeignFileError(f"{path} is damaged: '{key}' does not have one entry per pair")
    return obj


def pair_tensors(obj: dict[str, Any], i: int) -> tuple[dict[str, torch.Tensor], int]:
    """Pair ``i``'s stored vectors in a loaded cache, as the store keeps them ({"token_ids": int32 [T],
    "layer_<L>": fp16 [T, H]}), and its answer start."""
    vectors = obj["token_vectors"][i]
    if not isinstance(vectors, dict):
        raise ForeignFileError(f"the cache's vectors of pair {i} are not a mapping of layers; export it again")
    tensors = {str(k): v for k, v in vectors.items() if isinstance(v, torch.Tensor)}
    tensors["token_ids"] = torch.as_tensor(obj["token_ids"][i]).to(torch.int32)
    return tensors, int(obj["answer_starts"][i])


def recorded_entry(obj: dict[str, Any], i: int) -> dict[str, Any] | None:
    """Pair ``i``'s recorded base answer in a loaded cache, if it has one of the current prompt format in a usable
    shape (older caches have none)."""
    entries = obj.get("base_answers")
    entry = entries[i] if isinstance(entries, list) and 0 <= i < len(entries) else None
    if not isinstance(entry, dict) or entry.get("prompt_format") != PROMPT_FORMAT:
        return None
    ok = all(isinstance(entry.get(k), torch.Tensor) and entry[k].dim() == 1 for k in ("prompt_ids", "output_ids"))
    ok = ok and isinstance(entry.get("max_new_tokens"), int) and isinstance(entry.get("finished"), bool)
    return entry if ok and isinstance(entry.get("text"), str) else None


def variant_entries(obj: dict[str, Any], i: int) -> list[dict[str, Any]]:
    """Pair ``i``'s answers to rephrasings in a loaded cache, those of the current prompt format in a usable shape."""
    entries = obj.get("variant_answers")
    entries = entries[i] if isinstance(entries, list) and 0 <= i < len(entries) else None
    return [e for e in entries if isinstance(e, dict) and e.get("prompt_format") == PROMPT_FORMAT
            and isinstance(e.get("key"), str) and isinstance(e.get("output_ids"), torch.Tensor)
            and e["output_ids"].dim() == 1 and isinstance(e.get("max_new_tokens"), int)
            and isinstance(e.get("finished"), bool)] if isinstance(entries, list) else []


# -- import -------------------------------------------------------------------------------------------------------
_PAGE = 4096
_MADV_DONTNEED = 4


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def mapped_ranges(path: str | Path) -> list[tuple[int, int]]:
    """The address ranges at which this process has ``path`` memory-mapped (Linux ``/proc/self/maps``)."""
    target = str(Path(path).resolve())
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == target:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def release_pages(obj: dict[str, Any], lo: int, hi: int, ranges: list[tuple[int, int]],
                  _madvise=_madvise()) -> int:
    """Let the kernel drop the pages holding pairs ``lo:hi`` of a cache opened by :func:`load_cache`, once read.

    The cache is memory-mapped, and a mapped page stays in the process's resident set until the mapping goes, so
    reading a large cache pair by pair would still end with the whole file resident. ``MADV_DONTNEED`` on a clean
    page of a file mapping drops it; touching it again reads it back from the file, so a page shared with a pair
    not read yet costs a re-read, never data. Only pages inside ``ranges`` (the cache file's own mappings, see
    :func:`mapped_ranges`) are released: a tensor held anywhere else is left alone. Linux only; elsewhere the OS
    pages as it sees fit. Returns the bytes released.
    """
    if _madvise is None or not ranges:
        return 0
    spans = []
    for i in range(lo, min(hi, len(obj["qa_pairs"]))):
        tensors = [obj["token_ids"][i], obj["embeddings"][i], *obj["token_vectors"][i].values(),
                   *obj["embedding_fields"][i].values()]
        if "base_answers" in obj and isinstance(obj["base_answers"][i], dict):
            tensors += [v for v in obj["base_answers"][i].values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            for first, last in ranges:
                if first <= ptr and ptr + size <= last:
                    spans.append((max(first, ptr // _PAGE * _PAGE), min(last, -(-(ptr + size) // _PAGE) * _PAGE)))
                    break
    released = 0
    spans.sort()
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in merged:
        if _madvise(start, end - start, _MADV_DONTNEED) == 0:
            released += end - start
    return released


@dataclass
class ImportReport:
    added: int = 0
    skipped: int = 0
    vectors: int = 0
    embeddings: int = 0
    vectors_skipped_reason: str | None = None
    base_answers: int = 0
    variant_answers: int = 0  # answers to rephrasings added to the store's recorded answers

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pair_inputs(obj: dict[str, Any], path: str | Path) -> list:
    """The cache's pairs as store inputs, each checked against its hash."""
    from kvdb.store.pairs import PairInput, pair_hash

    items = []
    for i, qa in enumerate(obj["qa_pairs"]):
        if not isinstance(qa, dict) or pair_hash(str(qa.get("question", "")), str(qa.get("answer", ""))) != qa.get("hash"):
            raise ForeignFileError(f"{path} is damaged: pair {i} does not match its hash")
        items.append(PairInput(domain=qa["domain"], question=qa["question"], answer=qa["answer"],
                               metadata=qa.get("metadata") or {}, where=f"{path}#{i}"))
    if not items:
        raise ValidationError(f"{path} holds no pairs")
    return items


@dataclass
class _ImportPlan:
    """What one import writes besides the pairs: which products are reusable, and where the cache is mapped."""

    obj: dict[str, Any]
    path: str | Path
    items: list
    fingerprint: str
    embedder: str
    reuse_vectors: bool
    reuse_embeddings: bool
    source: str
    ranges: list[tuple[int, int]]


def _product_rows(plan: _ImportPlan, i: int, have: dict[str, set], report: ImportReport) -> dict[str, dict]:
    """Pair ``i``'s vectors, embedding and recorded answer as rows, those the store lacks; counted in ``report``."""
    from kvdb.store.blobs import pack

    obj, h, out = plan.obj, plan.items[i].hash, {}
    if plan.reuse_vectors and h not in have["vectors"]:
        tensors, answer_start = pair_tensors(obj, i)
        data, digest = pack(tensors)
        out["vectors"] = dict(pair_hash=h, fingerprint=plan.fingerprint, layers=list(obj["model"]["layers"]),
                              num_tokens=int(tensors["token_ids"].numel()), answer_start=answer_start, data=data,
                              checksum=digest)
        report.vectors += 1
    if plan.reuse_embeddings and h not in have["embeddings"]:
        fields = obj["embedding_fields"][i]
        data, digest = pack({k: v.float() for k, v in fields.items()})
        out["embeddings"] = dict(pair_hash=h, embedder=plan.embedder, dim=int(fields["question"].shape[-1]),
                                 data=data, checksum=digest)
        report.embeddings += 1
    entry = recorded_entry(obj, i) if plan.reuse_vectors and h not in have["answers"] else None
    if entry is not None:
        data, digest = pack({k: v for k, v in entry.items() if isinstance(v, torch.Tensor)})
        out["answers"] = dict(pair_hash=h, fingerprint=plan.fingerprint, prompt_format=PROMPT_FORMAT,
                              max_new_tokens=entry["max_new_tokens"], finished=entry["finished"], text=entry["text"],
                              data=data, checksum=digest)
        report.base_answers += 1
    for kind in out:
        have[kind].add(h)
    return out


def _write_products(session, plan: _ImportPlan, report: ImportReport,
                    on_progress: Callable[[int], None] | None) -> None:
    """Inside the import's transaction: the reusable vectors, embeddings and recorded answers of its pairs."""
    fp, model = plan.fingerprint, plan.obj["model"]
    have = {"vectors": set(session.scalars(select(PairVectors.pair_hash).where(PairVectors.fingerprint == fp))),
            "embeddings": set(session.scalars(select(Embedding.pair_hash).where(Embedding.embedder == plan.embedder))),
            "answers": set(session.scalars(select(BaseAnswer.pair_hash).where(
                BaseAnswer.fingerprint == fp, BaseAnswer.prompt_format == PROMPT_FORMAT)))}
    if plan.reuse_vectors:
        ensure_model(session, fp, name=model["name"], source=plan.source, hidden_size=int(model["hidden_size"]),
                     num_layers=int(model["num_layers"]),
                     info={"imported_from": str(plan.path), "layers": list(model.get("layers", []))})
    # Core inserts a chunk at a time: ORM objects would keep every blob in the session until commit.
    tables = {"vectors": PairVectors, "embeddings": Embedding, "answers": BaseAnswer}
    chunks: dict[str, list[dict]] = {k: [] for k in tables}

    def write_chunk() -> None:
        for kind, rows in chunks.items():
            if rows:
                session.execute(insert(tables[kind]), rows)
            rows.clear()

    for i in range(len(plan.items)):
        for kind, row in _product_rows(plan, i, have, report).items():
            chunks[kind].append(row)
        if i % 256 == 255:
            write_chunk()
            release_pages(plan.obj, i - 255, i + 1, plan.ranges)
            if on_progress:
                on_progress(i + 1)
    write_chunk()
    if plan.reuse_vectors:  # answers to rephrasings, in the same transaction as the pairs they are about
        recs = [Recording(e["key"], e["output_ids"].tolist(), e["finished"], e["max_new_tokens"], item.hash)
                for i, item in enumerate(plan.items) for e in variant_entries(plan.obj, i)]
        report.variant_answers = merge_recordings(session, fp, recs)


def import_cache(config: Config, home: Home, store: Store, path: str | Path,
                 on_progress: Callable[[int], None] | None = None) -> ImportReport:
    """Add the pairs of a cache, and its vectors, embeddings and recorded answers where they were made by the
    current model and embedder; all in one transaction."""
    from kvdb.identity import resolve_embedder, resolve_model
    from kvdb.store.pairs import add_pairs

    obj = load_cache(path)
    ref = resolve_model(config.model, home)
    emb_ref = resolve_embedder(config.embedder, home, ref.fingerprint)
    report = ImportReport()
    plan = _ImportPlan(obj, path, _pair_inputs(obj, path), ref.fingerprint, emb_ref.key,
                       reuse_vectors=obj["model"].get("fingerprint") == ref.fingerprint,
                       reuse_embeddings=obj.get("embedder", {}).get("key") == emb_ref.key,
                       source=config.model.source,
                       ranges=mapped_ranges(path))  # to release the pages of pairs already written (release_pages)
    if not plan.reuse_vectors:
        report.vectors_skipped_reason = (f"made by another model ({obj['model'].get('name')}); `kvdb build` "
                                         "recomputes them")
    added = add_pairs(store, plan.items, config.store, after=lambda session: _write_products(session, plan, report,
                                                                                              on_progress))
    report.added, report.skipped = added.added, added.skipped
    return report
