"""The prefix KV-state store: saved engine states of recurring prompt prefixes, restored instead of recomputed.

A state is keyed by sha256 over the engine's describe() and the exact token ids of the prefix, and it carries both in
its header, so a lookup returns it only for the same model, build, engine settings and token sequence (a hash match
whose header disagrees is treated as foreign and dropped). States live in memory (LRU, bounded in bytes) and, given
a directory, on disk (one file per state, written to a temporary name and renamed; the least recently used files
go when the folder passes its bound). A file whose checksum fails is deleted and the prefix recomputed. With
``background_writes`` the files are encoded and written by one writer thread, so an answer never waits for its
states to reach the disk (the interpreter finishes pending writes before it exits; ``flush`` waits for them).

File layout: MAGIC, an 8-byte little-endian header length, the header (JSON: token ids, engine key, next token,
kv length and sha256), then the KV bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kvdb.errors import CorruptError
from kvdb.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

MAGIC = b"KVDBSTATE1\n"
SUFFIX = ".kvstate"


def describe_key(describe: dict[str, Any]) -> str:
    """The canonical text of an engine's describe() (part of the key of everything stored for that engine)."""
    return json.dumps(describe, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class PrefixState:
    """The KV state of a context holding exactly ``token_ids``, made by the engine whose describe() is ``engine``.

    ``next_token`` is the engine's greedy token after the last of them, so a prompt equal to ``token_ids`` needs no
    model call at all."""

    token_ids: tuple[int, ...]
    engine: str  # describe_key(describe()) of the engine that saved it
    kv: bytes
    next_token: int


class StatefulEngine(Protocol):
    """What prefill_with_states needs of an engine (kvdb.engines.llama_cpp.LlamaCppEngine has it)."""

    def describe(self) -> dict[str, Any]: ...
    def prefill(self, prompt_ids: Sequence[int]) -> int: ...
    def extend(self, tokens: Sequence[int]) -> int: ...
    def save_state(self) -> PrefixState: ...
    def restore_state(self, state: PrefixState) -> int: ...


def prefix_keys(engine_key: str, token_ids: Sequence[int], lengths: Iterable[int]) -> dict[int, str]:
    """The store key of ``token_ids[:n]`` for each n in ``lengths`` (one incremental hash over the ids)."""
    wanted = sorted({n for n in lengths if 0 < n <= len(token_ids)})
    ids = np.asarray(token_ids, dtype="<i4").tobytes()
    h = hashlib.sha256(engine_key.encode() + b"\0")
    keys, done = {}, 0
    for n in wanted:
        h.update(ids[4 * done:4 * n])
        done = n
        keys[n] = h.copy().hexdigest()
    return keys


def state_key(state: PrefixState) -> str:
    return prefix_keys(state.engine, state.token_ids, [len(state.token_ids)])[len(state.token_ids)]


def encode_state(state: PrefixState) -> bytes:
    header = json.dumps({"token_ids": list(state.token_ids), "engine": state.engine, "next_token": state.next_token,
                         "kv_len": len(state.kv), "kv_sha256": hashlib.sha256(state.kv).hexdigest()}).encode()
    return MAGIC + struct.pack("<Q", len(header)) + header + state.kv


def decode_state(data: bytes) -> PrefixState:
    """The state in ``data``, or CorruptError when the bytes are not a whole, intact state file."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise CorruptError("not a kvdb prefix state file")
    start = len(MAGIC) + 8
    (n,) = struct.unpack("<Q", data[len(MAGIC):start])
    try:
        head = json.loads(data[start:start + n])
        kv = data[start + n:]
        ok = len(kv) == head["kv_len"] and hashlib.sha256(kv).hexdigest() == head["kv_sha256"]
        state = PrefixState(tuple(int(t) for t in head["token_ids"]), str(head["engine"]), kv,
                            int(head["next_token"]))
    except (ValueError, KeyError, TypeError):
        raise CorruptError("the prefix state's header is unreadable") from None
    if not ok:
        raise CorruptError("the prefix state's KV bytes fail their checksum")
    return state


@dataclass
class StateStats:
    hits: int = 0
    misses: int = 0
    dropped: int = 0  # corrupt or foreign entries deleted
    saved: int = 0


class StateCache:
    """Prefix states in memory (LRU, ``memory_bytes``) and under ``directory`` (LRU by mtime, ``disk_bytes``)."""

    def __init__(self, directory: Path | None = None, memory_bytes: int = 256 << 20, disk_bytes: int = 2 << 30,
                 background_writes: bool = False):
        self.directory = Path(directory) if directory is not None else None
        self.memory_bytes, self.disk_bytes = memory_bytes, disk_bytes
        self._memory: OrderedDict[str, PrefixState] = OrderedDict()
        self._memory_total = 0
        self.stats = StateStats()
        # One writer thread: files are written in order, and disk trimming never races with itself.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvdb-states") if background_writes else None
        self._pending: list[Future] = []

    # ---- lookups ----

    def get(self, token_ids: Sequence[int], engine_key: str) -> PrefixState | None:
        """The state of exactly ``token_ids`` made by the engine ``engine_key``, or None."""
        return self.longest_prefix(token_ids, engine_key, [len(token_ids)])

    def longest_prefix(self, token_ids: Sequence[int], engine_key: str,
                       lengths: Iterable[int] | None = None) -> PrefixState | None:
        """The stored state of the longest ``token_ids[:n]`` (n in ``lengths``, default every length), or None."""
        keys = prefix_keys(engine_key, token_ids, range(1, len(token_ids) + 1) if lengths is None else lengths)
        for n in sorted(keys, reverse=True):
            state = self._load(keys[n], tuple(token_ids[:n]), engine_key)
            if state is not None:
                self.stats.hits += 1
                return state
        self.stats.misses += 1
        return None

    def _load(self, key: str, token_ids: tuple[int, ...], engine_key: str) -> PrefixState | None:
        state = self._memory.get(key)
        if state is None:
            state = self._read_file(key)
        if state is None:
            return None
        if state.token_ids != token_ids or state.engine != engine_key:
            log.warning("prefix state %s belongs to another token sequence or engine; dropping it", key[:12])
            self._forget(key)
            return None
        self._remember(key, state)
        return state

    def _read_file(self, key: str) -> PrefixState | None:
        if self.directory is None:
            return None
        path = self.directory / f"{key}{SUFFIX}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read prefix state %s (%s); recomputing it", path, exc)
            return None
        try:
            state = decode_state(data)
        except CorruptError as exc:
            log.warning("prefix state %s is corrupt (%s); deleting it, the prefix will be recomputed", path, exc)
            self._forget(key)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # the disk LRU goes by mtime
        return state

    # ---- writes ----

    def put(self, state: PrefixState) -> None:
        """Keep ``state`` in memory and, with a directory, on disk (by the writer thread, if there is one)."""
        key = state_key(state)
        self._remember(key, state)
        self.stats.saved += 1
        if self.directory is None:
            return
        if self._writer is None:
            self._write(key, state)
            return
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._writer.submit(self._write, key, state))

    def _write(self, key: str, state: PrefixState) -> None:
        try:
            atomic_write_bytes(self.directory / f"{key}{SUFFIX}", encode_state(state))
        except OSError as exc:  # a full or read-only disk costs the cache, never the answer
            log.warning("cannot write prefix state under %s (%s); keeping it in memory only", self.directory, exc)
            return
        self._trim_disk()

    def flush(self) -> None:
        """Wait until every state put so far is on disk."""
        for future in self._pending:
            future.result()
        self._pending = []

    def drop(self, state: PrefixState) -> None:
        """Delete a state that failed to load into its engine (it will be recomputed and stored again)."""
        self._forget(state_key(state))

    def _remember(self, key: str, state: PrefixState) -> None:
        old = self._memory.pop(key, None)
        self._memory_total += len(state.kv) - (len(old.kv) if old is not None else 0)
        self._memory[key] = state
        while self._memory_total > self.memory_bytes and self._memory:
            self._memory_total -= len(self._memory.popitem(last=False)[1].kv)

    def _forget(self, key: str) -> None:
        old = self._memory.pop(key, None)
        self._memory_total -= len(old.kv) if old is not None else 0
        self.stats.dropped += 1
        if self.directory is not None:
            with contextlib.suppress(OSError):
                (self.directory / f"{key}{SUFFIX}").unlink()

    def _trim_disk(self) -> None:
        """Delete the least recently used files until the folder is within its bound."""
        entries = sorted(self._file_entries())
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.disk_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
            total -= size

    def _file_entries(self) -> list[tuple[int, int, Path]]:
        """(mtime, size, path) of every state file (one another process removes meanwhile is skipped)."""
        if self.directory is None or not self.directory.is_dir():
            return []
        out = []
        for path in self.directory.iterdir():
            if path.name.endswith(SUFFIX):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    out.append((st.st_mtime_ns, st.st_size, path))
        return out

    # ---- reporting and repair ----

    def check(self, engine_key: str | None = None, fix: bool = False) -> dict[str, int]:
        """Read every state file and count the intact ones (of ``engine_key`` when given), those of other engines
        (stale once the model, build or settings changed) and the corrupt or misplaced ones; ``fix`` deletes all
        but the intact ones."""
        counts = {"ok": 0, "other_engine": 0, "corrupt": 0}
        self.flush()
        for _, _, path in self._file_entries():
            try:
                state = decode_state(path.read_bytes())
                kind = "ok" if engine_key is None or state.engine == engine_key else "other_engine"
                if path.name != f"{state_key(state)}{SUFFIX}":
                    kind = "corrupt"
            except CorruptError:
                kind = "corrupt"
            except OSError:
                continue  # removed meanwhile
            counts[kind] += 1
            if fix and kind != "ok":
                with contextlib.suppress(OSError):
                    path.unlink()
        return counts


    def usage(self) -> dict[str, float]:
        """Entries and bytes held, and the KV bytes per cached token (what a prefix costs to keep)."""
        self.flush()
        states = list(self._memory.values())
        tokens = sum(len(s.token_ids) for s in states)
        kv = sum(len(s.kv) for s in states)
        files = self._file_entries()
        return {"memory_entries": len(states), "memory_bytes": kv,
                "disk_entries": len(files), "disk_bytes": sum(size for _, size, _ in files),
                "bytes_per_token": kv / tokens if tokens else 0.0,
                "hits": self.stats.hits, "misses": self.stats.misses, "dropped": self.stats.dropped}


def prefill_with_states(engine: StatefulEngine, cache: StateCache, prompt_ids: Sequence[int],
                        boundaries: Iterable[int] = (), save_whole: bool = True) -> int:
    """``engine.prefill(prompt_ids)`` reusing the longest stored prefix state among ``boundaries`` and the whole
    prompt, and storing the state at each boundary past it (and, with ``save_whole``, of the whole prompt) for next
    time.

    Exact on a build whose rows do not depend on their batch: the restored cells and the rows decoded after them
    are those a single full prefill computes."""
    key = describe_key(engine.describe())
    cuts = sorted({n for n in boundaries if 0 < n < len(prompt_ids)} | {len(prompt_ids)})
    hit = cache.longest_prefix(prompt_ids, key, cuts)
    done, nxt = 0, -1
    if hit is not None:
        try:
            nxt, done = engine.restore_state(hit), len(hit.token_ids)
        except CorruptError as exc:
            log.warning("%s; recomputing the prefix", exc)
            cache.drop(hit)
    for cut in (c for c in cuts if c > done):
        nxt = engine.prefill(prompt_ids[:cut]) if done == 0 else engine.extend(prompt_ids[done:cut])
        if save_whole or cut < len(prompt_ids):
            cache.put(engine.save_state())
        done = cut
    return nxt


@dataclass(frozen=True)
class PrefixReuse:
    """What one prefill may reuse: the state store, and where the prompt's recurring prefixes end (kvdb.prompt's
    ``prefix_boundaries``)."""

    cache: StateCache
    boundaries: tuple[int, ...] = ()
    # The whole prompt's state serves only an exact repeat of the prompt; an engine that replays its answers
    # (kvdb.replay) never decodes that again, so it keeps the boundaries' states alone (and its memory for them).
    save_whole: bool = True

    def prefill(self, engine: StatefulEngine, prompt_ids: Sequence[int]) -> int:
        return prefill_with_states(engine, self.cache, prompt_ids, self.boundaries, self.save_whole)
