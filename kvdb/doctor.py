"""`kvdb doctor`: check a home end to end and repair what can be rebuilt from the store.

Checks, in order: the schema revision, SQLite's own ``integrity_check``, rows whose pair is gone, foreign keys, every
stored blob against its checksum, the FAISS index against the store, temporary files a killed write left behind, and
that every export and checkpoint file loads. On PostgreSQL the SQLite-only check (``integrity_check``) is reported as
skipped with the reason, and foreign keys are checked with plain SQL instead of ``PRAGMA foreign_key_check``. The store's pairs are the source of truth and are never touched; what
``repair`` deletes is derived data (a damaged blob, an orphan row, a stale or broken index, a temp file) that
`kvdb build` or the next query makes again. Files a user may want to keep (exports, checkpoints) are only reported.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exc, null, select

from kvdb.errors import CorruptError, KvdbError
from kvdb.store.blobs import unpack
from kvdb.store.models import BaseAnswer, Embedding, EngineAnswer, Pair, PairVectors, RecordedAnswer

OK, PROBLEM, REPAIRED, SKIPPED = "ok", "problem", "repaired", "skipped"

# Temporary names of kvdb.fileio (".NAME.<pid>.<random>.tmp"; files of older kvdb versions: ".NAME.<random>.tmp").
TEMP_RE = re.compile(r"^\..+\.tmp$")
_TEMP_PID = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp$")
# A temp file younger than this may belong to a write in progress in another process: it is left alone.
TEMP_MIN_AGE_S = 120.0
_CHUNK = 64  # blob rows read at a time: bounds memory on a large store


class ProblemsFound(CorruptError):
    """`kvdb doctor` found problems that are still there after it ran."""


@dataclass
class Finding:
    check: str
    status: str  # ok | problem | repaired | skipped (does not apply to this backend; the detail says why)
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "detail": self.detail}


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    repair: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status == PROBLEM]

    def add(self, check: str, status: str, detail: str) -> None:
        self.findings.append(Finding(check, status, detail))

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "repair": self.repair, "findings": [f.as_dict() for f in self.findings]}


# -- the checks ---------------------------------------------------------------------------------------------------
def check(runtime, repair: bool = False, temp_min_age_s: float = TEMP_MIN_AGE_S) -> Report:
    """Run every check on ``runtime``'s home and store; with ``repair`` fix what can be rebuilt."""
    report = Report(repair=repair)
    store = runtime.unmigrated_store()
    try:
        if _check_schema(report, store):
            _check_integrity(report, store)
            _check_orphans(report, store, repair)
            _check_foreign_keys(report, store)
            _check_blobs(report, store, repair)
            _check_index(report, runtime, store, repair)
    finally:
        store.dispose()
    _check_temp_files(report, runtime.home.root, repair, temp_min_age_s)
    _check_exports(report, runtime.home.cache_dir)
    _check_checkpoints(report, runtime.home.checkpoints_dir)
    _check_prefix_states(report, runtime.home.models_dir / "states", repair)
    return report


def _check_schema(report: Report, store) -> bool:
    """True when the store exists at the head revision (the other store checks need its tables)."""
    if store.is_sqlite and store.where and store.where != ":memory:" and not Path(store.where).exists():
        report.add("schema", OK, f"no store yet at {store.where} (it is created on first use)")
        return False
    try:
        current, head = store.current_revision(), store.head_revision()
    except (KvdbError, exc.DBAPIError) as e:
        if not store.is_sqlite:
            report.add("schema", PROBLEM, f"{_first_line(e)}")
            return False
        report.add("schema", PROBLEM, f"the store at {store.where} cannot be read ({_first_line(e)}); restore a "
                                      "backup, or recover it with `sqlite3 kvdb.sqlite .recover`")
        return False
    if current == head:
        report.add("schema", OK, f"revision {current} is the newest")
        return True
    if current is None:
        report.add("schema", PROBLEM, f"the store at {store.where} has no schema yet; run `kvdb init`")
    else:
        report.add("schema", PROBLEM, f"revision {current}, this kvdb needs {head}; run `kvdb db upgrade`")
    return False


def _check_integrity(report: Report, store) -> None:
    if not store.is_sqlite:
        report.add("integrity", SKIPPED, "PRAGMA integrity_check is SQLite's; on PostgreSQL check pages with its "
                                         "data checksums or pg_amcheck (the checks below still read every row and "
                                         "blob)")
        return
    try:
        with store.engine.connect() as conn:
            rows = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check").fetchall()]
    except exc.DBAPIError as e:
        rows = [_first_line(e)]
    if rows == ["ok"]:
        report.add("integrity", OK, "PRAGMA integrity_check: ok")
    else:
        shown = "; ".join(rows[:3]) + (f" (+{len(rows) - 3} more)" if len(rows) > 3 else "")
        report.add("integrity", PROBLEM, f"the database file is damaged ({shown}); restore a backup, or recover it "
                                         "with `sqlite3 kvdb.sqlite .recover`")


_BLOB_TABLES = (
    # (model, what one row is, the command that makes a deleted row again)
    (PairVectors, "vectors", "kvdb build"),
    (Embedding, "embedding", "kvdb build"),
    (BaseAnswer, "base answer", "kvdb train"),
)
# Blobs checked against their checksums: the above, recorded answers (about a pair that may live only in a cache
# file, so never orphans) and engines' replayed answers (keyed by prompt, not by pair).
_CHECKSUMMED = _BLOB_TABLES + ((RecordedAnswer, "recorded answer", "kvdb query --generate"),
                               (EngineAnswer, "replayed answer", "kvdb query --generate"))


def _check_orphans(report: Report, store, repair: bool) -> None:
    found: dict[str, list[int]] = {}
    with store.read() as session:
        for model, _, _ in _BLOB_TABLES:
            ids = list(session.scalars(select(model.id).where(model.pair_hash.not_in(select(Pair.hash)))))
            if ids:
                found[model.__tablename__] = ids
    if not found:
        report.add("orphans", OK, "no vectors, embeddings or base answers without their pair")
        return
    counts = ", ".join(f"{len(ids)} in {table}" for table, ids in found.items())
    if not repair:
        report.add("orphans", PROBLEM, f"rows whose pair is gone: {counts}; run `kvdb doctor --repair`")
        return
    with store.write() as session:
        for model, _, _ in _BLOB_TABLES:
            for chunk in _chunks(found.get(model.__tablename__, []), 500):
                session.execute(delete(model).where(model.id.in_(chunk)))
        if Embedding.__tablename__ in found:
            store.bump_revision(session)
    report.add("orphans", REPAIRED, f"deleted rows whose pair is gone: {counts}")


def _check_foreign_keys(report: Report, store) -> None:
    by_edge: dict[str, int] = {}
    if store.is_sqlite:
        how = "PRAGMA foreign_key_check"
        with store.engine.connect() as conn:
            rows = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        for table, _rowid, parent, _fk in rows:
            by_edge[f"{table} -> {parent}"] = by_edge.get(f"{table} -> {parent}", 0) + 1
    else:
        how = "every foreign key checked by SQL"
        with store.read() as session:
            for table, parent, n in _dangling_references(session):
                by_edge[f"{table} -> {parent}"] = by_edge.get(f"{table} -> {parent}", 0) + n
    if not by_edge:
        report.add("foreign_keys", OK, f"{how}: no dangling references")
        return
    shown = ", ".join(f"{n} in {edge}" for edge, n in sorted(by_edge.items()))
    report.add("foreign_keys", PROBLEM, f"rows refer to rows that do not exist ({shown}); remove them with "
                                        "`kvdb remove` or restore a backup")


def _dangling_references(session) -> Iterator[tuple[str, str, int]]:
    """(table, parent table, rows) for every foreign key of the schema whose rows name a parent that is not there;
    portable SQL for servers without SQLite's PRAGMA (which enforce foreign keys themselves, so this finds nothing
    unless they were switched off or the rows were loaded around them)."""
    from sqlalchemy import func

    from kvdb.store.models import Base

    for table in Base.metadata.sorted_tables:
        for fk in table.foreign_keys:
            child, parent = fk.parent, fk.column
            n = session.scalar(select(func.count()).select_from(table).where(
                child.is_not(None), ~select(parent).where(parent == child).exists()))
            if n:
                yield table.name, parent.table.name, int(n)


def _blob_rows(store, model) -> Iterator[tuple]:
    """(id, pair hash, data, checksum, row) for every row of ``model``, a chunk at a time."""
    last = 0
    pair = model.pair_hash if hasattr(model, "pair_hash") else null().label("pair_hash")  # replayed answers: none
    cols = [model.id, pair, model.data, model.checksum]
    if model is PairVectors:
        cols += [PairVectors.num_tokens, PairVectors.layers]
    while True:
        with store.read() as session:
            rows = session.execute(select(*cols).where(model.id > last).order_by(model.id).limit(_CHUNK)).all()
        if not rows:
            return
        yield from rows
        last = rows[-1][0]


def _blob_problem(model, row, what: str) -> str | None:
    """Why one stored blob is bad, or None."""
    try:
        tensors = unpack(row[2], row[3], what)
    except CorruptError as e:
        return "fails its checksum (the stored bytes were changed)" if "checksum" in str(e) else "cannot be decoded"
    if model is PairVectors:
        num_tokens, layers = row[4], row[5] or []
        ids = tensors.get("token_ids")
        if ids is None or ids.numel() != num_tokens:
            return f"holds {0 if ids is None else ids.numel()} token ids, not the {num_tokens} recorded"
        for layer in layers:
            t = tensors.get(f"layer_{layer}")
            if t is None or t.shape[0] != num_tokens:
                return f"lacks the full layer {layer}"
    elif model is Embedding and "question" not in tensors:
        return "lacks the question's vector"
    return None


def _check_blobs(report: Report, store, repair: bool) -> None:
    counted: dict[str, int] = {}
    bad: list[tuple[Any, int, str, str]] = []  # model, row id, pair hash, why
    for model, what, _ in _CHECKSUMMED:
        n = 0
        for row in _blob_rows(store, model):
            n += 1
            why = _blob_problem(model, row, f"{what} of pair {(row[1] or '-')[:12]}")
            if why is not None:
                bad.append((model, row[0], row[1], why))
        counted[what] = n
    summary = ", ".join(f"{n} {what} row(s)" for what, n in counted.items())
    if not bad:
        report.add("blobs", OK, f"every blob matches its checksum ({summary})")
        return
    if repair:
        with store.write() as session:
            for model, row_id, _, _ in bad:
                session.execute(delete(model).where(model.id == row_id))
            if any(model is Embedding for model, *_ in bad):
                store.bump_revision(session)
    for model, row_id, pair, why in bad:
        what, how = next((w, h) for m, w, h in _CHECKSUMMED if m is model)
        about = f" of pair {pair[:12]}" if pair else ""
        where = f"the {what} blob{about} ({model.__tablename__} row {row_id})"
        if repair:
            report.add("blobs", REPAIRED, f"deleted {where}, which {why}; run `{how}` to make it again")
        else:
            report.add("blobs", PROBLEM, f"{where} {why}; run `kvdb doctor --repair`, then `{how}`")


# -- the index ----------------------------------------------------------------------------------------------------
class _KeyOnly:
    """Stands in for a loaded embedder where only its key is needed (rebuilding an index reads stored vectors)."""

    def __init__(self, key: str):
        from kvdb.identity import EmbedderRef

        self.ref = EmbedderRef(source="", name=key, key=key, path=None)


def _retriever(runtime, store, key: str):
    from kvdb.retrieve import Retriever

    return Retriever(runtime.config, runtime.home, store, embedder=_KeyOnly(key))


def _check_index(report: Report, runtime, store, repair: bool) -> None:
    from kvdb.errors import IndexCorruptError
    from kvdb.index import VectorIndex
    from kvdb.retrieve import SLOTS

    with store.read() as session:
        revision = store.revision(session)
        keys = list(session.scalars(select(Embedding.embedder).distinct().order_by(Embedding.embedder)))
    dirs = {_retriever(runtime, store, k).index_dir: k for k in keys}
    root = runtime.home.index_dir
    unclaimed = sorted(p for p in root.iterdir() if p.is_dir() and p not in dirs) if root.is_dir() else []
    if not keys and not unclaimed:
        report.add("index", OK, "no index yet (nothing is built; `kvdb build` makes one)")
        return
    for folder in unclaimed:  # an index for an embedder the store has no vectors of (e.g. every pair removed)
        try:
            index = VectorIndex.load(folder)
        except IndexCorruptError as e:
            if repair:
                shutil.rmtree(folder, ignore_errors=True)
                report.add("index", REPAIRED, f"removed the unreadable index {folder} ({e}); no stored embeddings "
                                              "belong to it")
            else:
                report.add("index", PROBLEM, f"{e}; run `kvdb doctor --repair`")
            continue
        key = (index.meta.get("embedder") if index is not None else None) or folder.name
        dirs[folder] = key
    for folder, key in sorted(dirs.items()):
        with store.read() as session:
            live = set(session.scalars(select(Pair.id).join(Embedding, Embedding.pair_hash == Pair.hash)
                                       .where(Embedding.embedder == key)))
        problem, stale = None, None
        try:
            index = VectorIndex.load(folder)
        except IndexCorruptError as e:
            index, problem = None, re.sub(r"; (it|the index) will be rebuilt\.$", "", str(e))
        if index is None and problem is None:
            stale = "has not been written yet"
        elif index is not None:
            covered = {int(i) // SLOTS for i in index.ids()}
            if index.meta.get("embedder") != key:
                problem = f"describes embedder {index.meta.get('embedder')!r}, not {key!r}"
            elif index.meta.get("revision") != revision:
                stale = f"is at store revision {index.meta.get('revision')}, the store at {revision}"
            elif covered != live or index.meta.get("pairs") != len(live):
                problem = (f"covers {len(covered)} pair(s) at the store's revision, but {len(live)} pair(s) have "
                           f"embeddings ({len(covered - live)} extra, {len(live - covered)} missing)")
        if problem is None and stale is None:
            report.add("index", OK, f"index of {key} agrees with the store ({len(live)} pairs, revision {revision})")
            continue
        if repair:
            try:
                rebuilt = _retriever(runtime, store, key).rebuild(revision)
            except (KvdbError, OSError) as e:
                report.add("index", PROBLEM, f"index of {key} could not be rebuilt: {_first_line(e)}")
                continue
            why = problem or f"it {stale}"
            report.add("index", REPAIRED, f"rebuilt the index of {key} from the store ({why}); it covers "
                                          f"{rebuilt.meta.get('pairs', 0)} pairs")
        elif problem is not None:
            report.add("index", PROBLEM, f"index of {key} at {folder}: {problem}; run `kvdb doctor --repair`")
        else:
            # The index is a cache keyed by the store revision: a query rebuilds a stale one before searching.
            report.add("index", OK, f"index of {key} {stale}; the next query rebuilds it (or `kvdb doctor --repair`)")


# -- files --------------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but is not ours
    return True


def _check_temp_files(report: Report, root: Path, repair: bool, min_age_s: float) -> None:
    if not root.is_dir():
        return
    now = time.time()
    orphans, busy = [], []
    for dirpath, dirs, files in os.walk(root):
        temp_dirs = [d for d in dirs if TEMP_RE.match(d)]  # kvdb.fileio.atomic_dir's, judged whole
        dirs[:] = [d for d in dirs if d not in temp_dirs]
        for name in [*temp_dirs, *files]:
            if not TEMP_RE.match(name):
                continue
            path = Path(dirpath) / name
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue  # renamed or removed by its writer meanwhile
            m = _TEMP_PID.match(name)
            writer_alive = m is not None and int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1)))
            (busy if writer_alive or age < min_age_s else orphans).append(path)
    for path in orphans:
        rel = path.relative_to(root)
        if repair:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                report.add("temp_files", REPAIRED, f"removed {rel}, left by an interrupted write")
            except FileNotFoundError:
                pass
            except OSError as e:
                report.add("temp_files", PROBLEM, f"cannot remove {rel} ({e.strerror})")
        else:
            report.add("temp_files", PROBLEM, f"{rel} was left by an interrupted write; run `kvdb doctor --repair`")
    if not orphans:
        extra = f" ({len(busy)} being written now, left alone)" if busy else ""
        report.add("temp_files", OK, f"no temporary files left by interrupted writes{extra}")


def _check_exports(report: Report, folder: Path) -> None:
    from kvdb.export import load_cache

    files = sorted(folder.glob("*.pth")) if folder.is_dir() else []
    bad = 0
    for path in files:
        try:
            load_cache(path)
        except KvdbError as e:
            bad += 1
            report.add("exports", PROBLEM, f"{e}; run `kvdb export` to write it again")
    if not bad:
        report.add("exports", OK, f"{len(files)} export file(s) load" if files else "no export files")


def _check_checkpoints(report: Report, folder: Path) -> None:
    files = sorted(folder.rglob("*.pth")) if folder.is_dir() else []
    bad = 0
    if files:
        from kvdb.draft import read_checkpoint

    for path in files:
        try:
            read_checkpoint(path)  # torch.load(weights_only=True) and the envelope check
        except KvdbError as e:
            bad += 1
            report.add("checkpoints", PROBLEM, f"{e}")
    if not bad:
        report.add("checkpoints", OK, f"{len(files)} checkpoint(s) load" if files else "no checkpoints")


def _check_prefix_states(report: Report, folder: Path, repair: bool) -> None:
    """Every saved llama.cpp prefix state reads back whole (header, checksum, name); a damaged one would only be
    recomputed, so --repair deletes it."""
    if not folder.is_dir():
        report.add("prefix states", OK, "no prefix states")
        return
    from kvdb.engines.statecache import StateCache

    cache = StateCache(folder)
    counts = cache.check(fix=repair)
    size = cache.usage()["disk_bytes"]
    if counts["corrupt"]:
        fix = "deleted" if repair else "run `kvdb doctor --repair` to delete them (they are recomputed when needed)"
        report.add("prefix states", REPAIRED if repair else PROBLEM,
                   f"{counts['corrupt']} damaged prefix state file(s) in {folder}; {fix}")
    else:
        report.add("prefix states", OK, f"{counts['ok']} prefix state(s), {size / 2**20:.1f} MiB")


# -- helpers ------------------------------------------------------------------------------------------------------
def _chunks(seq: list, size: int) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def raise_if_problems(report: Report) -> None:
    problems = report.problems
    if problems:
        raise ProblemsFound(f"{len(problems)} problem(s) found; see above (`kvdb doctor --repair` fixes what can be "
                            "rebuilt from the store)")

