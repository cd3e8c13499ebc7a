"""The base model's recorded answers: looked up by exact prompt before decoding, recorded after it, kept in the store.

A recorded answer to the very prompt being answered is an exact draft (the base model verifies it in a few long
steps); recorded answers about the retrieved pairs are copy sources. Two tables hold them, both keyed by the exact
prompt ids, so a rerun of training computes nothing twice:

- ``base_answers``: the answer to a pair's own question under retrieval's references, one per pair, model and prompt
  format (with the states the draft attends to, filled in by training);
- ``recorded_answers``: every other prompt (training's variants and extra contexts, pairs only in a cache file,
  rephrasings asked by `kvdb query --generate`), keyed by model fingerprint and the sha256 of the prompt ids, tagged
  with the pair the prompt asks about when it is known. Each answer is written in a transaction of its own, so
  concurrent queries never lose each other's recordings, and at most ``PER_PAIR`` answers are kept per pair (the
  oldest go in the same transaction); answers about no pair are kept up to ``UNPAIRED`` per model.

Homes made before the table kept these answers in a JSON file under ``checkpoints/base_answers/``; it is imported
once, the first time an answer book is opened, and renamed to ``*.imported``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import delete, select

from kvdb.errors import CorruptError, StoreError
from kvdb.prompt import PROMPT_FORMAT
from kvdb.store.blobs import pack, unpack
from kvdb.store.basemodels import ensure_model
from kvdb.store.models import BaseAnswer, Pair, RecordedAnswer

log = logging.getLogger(__name__)

PER_PAIR = 16  # recorded answers kept about one pair: the latest, what copies draw on and exports carry
UNPAIRED = 1024  # recorded answers about no known pair kept per model (replayed only when asked verbatim again)


@dataclass
class AnswerRequest:
    prompt: list[int]
    pair_hash: str | None = None  # set for a pair's own question with retrieval's references: kept in base_answers
    output: list[int] | None = None
    group: Any = None  # requests of one group share their prompt's prefix (same references): run it once
    about: str | None = None  # the pair this prompt asks about (its question or a rephrasing), if known


@dataclass
class Recording:
    """One row of ``recorded_answers``, as code reads it."""

    key: str
    output: list[int]
    finished: bool
    max_new_tokens: int
    pair: str | None = None


def prompt_key(prompt: Sequence[int]) -> str:
    """The sha256 of the prompt ids: what a recorded answer is found by."""
    return hashlib.sha256(json.dumps(list(prompt)).encode()).hexdigest()


def usable_answer(output: list[int], finished: bool, recorded_limit: int, limit: int) -> list[int] | None:
    """A recorded answer serves a request for ``limit`` new tokens if it finished or was allowed as many."""
    if finished or recorded_limit >= limit:
        return output[:limit]
    return None


# -- the recorded_answers table -------------------------------------------------------------------------------------
def _recording(row: RecordedAnswer) -> Recording | None:
    try:
        ids = unpack(row.data, row.checksum, f"recorded answer {row.prompt_key[:12]}")["output_ids"]
    except (CorruptError, KeyError):
        return None  # a damaged recording only costs speed; `kvdb doctor` reports it
    return Recording(row.prompt_key, ids.tolist(), bool(row.finished), int(row.max_new_tokens), row.pair_hash)


def _trim(session, fingerprint: str, pair: str | None) -> None:
    """Delete the oldest recordings about ``pair`` beyond the bound (inside the writing transaction)."""
    keep = PER_PAIR if pair is not None else UNPAIRED
    same_pair = RecordedAnswer.pair_hash == pair if pair is not None else RecordedAnswer.pair_hash.is_(None)
    old = list(session.scalars(select(RecordedAnswer.id).where(RecordedAnswer.fingerprint == fingerprint, same_pair)
                               .order_by(RecordedAnswer.id.desc()).offset(keep)))
    if old:
        session.execute(delete(RecordedAnswer).where(RecordedAnswer.id.in_(old)))


def _put(session, fingerprint: str, rec: Recording, replace: bool = True) -> bool:
    """Insert or (with ``replace``) overwrite the recording of ``rec.key``; returns whether a row was written."""
    row = session.scalars(select(RecordedAnswer).where(RecordedAnswer.fingerprint == fingerprint,
                                                       RecordedAnswer.prompt_key == rec.key)).first()
    if row is not None and not replace:
        return False
    if row is not None:
        session.delete(row)  # re-inserted below: a newer recording is the latest of its pair
        session.flush()
    data, digest = pack({"output_ids": torch.tensor(rec.output, dtype=torch.int32)})
    session.add(RecordedAnswer(fingerprint=fingerprint, prompt_key=rec.key, prompt_format=PROMPT_FORMAT,
                               pair_hash=rec.pair, max_new_tokens=rec.max_new_tokens, finished=rec.finished,
                               data=data, checksum=digest))
    session.flush()
    _trim(session, fingerprint, rec.pair)
    return True


def record_answer(store, fingerprint: str, rec: Recording) -> None:
    """Keep one recording: one transaction (the bound of its pair applied in it)."""
    with store.write() as session:
        _put(session, fingerprint, rec)


def merge_recordings(session, fingerprint: str, recs: Sequence[Recording]) -> int:
    """Add the recordings whose prompts have none yet, inside the caller's transaction (`kvdb import`, the answer
    file's import); returns how many were added."""
    return sum(_put(session, fingerprint, r, replace=False) for r in recs)


def read_recordings(store, fingerprint: str, keys: Sequence[str]) -> dict[str, Recording]:
    """The recordings of the prompts ``keys`` (current prompt format), by key."""
    out: dict[str, Recording] = {}
    keys = list(dict.fromkeys(keys))
    with store.read() as session:
        for i in range(0, len(keys), 500):
            for row in session.scalars(select(RecordedAnswer).where(
                    RecordedAnswer.fingerprint == fingerprint, RecordedAnswer.prompt_format == PROMPT_FORMAT,
                    RecordedAnswer.prompt_key.in_(keys[i : i + 500]))):
                rec = _recording(row)
                if rec is not None:
                    out[rec.key] = rec
    return out


def recordings_by_pair(store, fingerprint: str, hashes: Sequence[str] | None = None) -> dict[str, list[Recording]]:
    """The recordings about each pair (``hashes``, or every pair), oldest first: {pair hash: [Recording]}."""
    query = select(RecordedAnswer).where(RecordedAnswer.fingerprint == fingerprint,
                                         RecordedAnswer.prompt_format == PROMPT_FORMAT,
                                         RecordedAnswer.pair_hash.is_not(None))
    if hashes is not None:
        query = query.where(RecordedAnswer.pair_hash.in_(list(hashes)))
    out: dict[str, list[Recording]] = {}
    with store.read() as session:
        for row in session.scalars(query.order_by(RecordedAnswer.id)):
            rec = _recording(row)
            if rec is not None:
                out.setdefault(rec.pair, []).append(rec)
    return out


def tag_recordings(store, fingerprint: str, about: dict[str, str]) -> int:
    """Name the pair each recorded prompt (``about``: prompt key -> pair hash) asks about where a recording lacks
    it or names another; one transaction. Returns how many were changed."""
    if not about:
        return 0
    changed = 0
    with store.write() as session:
        keys = list(about)
        for i in range(0, len(keys), 500):
            rows = session.scalars(select(RecordedAnswer).where(RecordedAnswer.fingerprint == fingerprint,
                                                                RecordedAnswer.prompt_key.in_(keys[i : i + 500])))
            for row in rows:
                if row.pair_hash != about[row.prompt_key]:
                    row.pair_hash = about[row.prompt_key]
                    changed += 1
        for pair in set(about.values()) if changed else ():
            _trim(session, fingerprint, pair)
    return changed


# -- the answer file of older homes -----------------------------------------------------------------------------------
def answer_file(home, fingerprint: str) -> Path:
    """Where homes before the ``recorded_answers`` table kept these answers for one model and prompt format."""
    return home.checkpoints_dir / "base_answers" / f"{fingerprint[:16]}-{PROMPT_FORMAT}.json"


def _file_recordings(path: Path) -> list[Recording]:
    """The well-formed entries of an answer file, in the order they were recorded."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the answer file {path} ({exc}); move it away to continue without it") \
            from None
    out = []
    for key, e in (data.items() if isinstance(data, dict) else ()):
        ids = e.get("output") if isinstance(e, dict) else None
        if not (isinstance(key, str) and isinstance(ids, list)
                and all(isinstance(t, int) and 0 <= t < 2**31 for t in ids)):
            continue
        pair = e.get("pair") if isinstance(e.get("pair"), str) else None
        out.append(Recording(key, ids, bool(e.get("finished")), int(e.get("max_new_tokens") or 0), pair))
    return out


def import_answer_file(store, home, fingerprint: str) -> int:
    """Import the home's old answer file for this model into the store (one transaction; recordings already there
    are kept), then rename it to ``*.imported``. Returns how many recordings were added."""
    path = answer_file(home, fingerprint)
    if not path.is_file():
        return 0
    recs = _file_recordings(path)
    with store.write() as session:
        added = merge_recordings(session, fingerprint, recs)
    try:
        os.replace(path, path.with_name(path.name + ".imported"))
    except FileNotFoundError:
        pass  # another process imported it at the same time (adding nothing twice)
    except OSError as exc:
        raise StoreError(f"imported {path} but cannot rename it ({exc.strerror}); check that the home is writable")
    log.info("imported %d recorded answers from %s", added, path)
    return added


# -- the answer book ------------------------------------------------------------------------------------------------
class AnswerBook:
    """The base model's greedy answers, by exact prompt (a prompt holds the question and its references).

    A pair's own question goes to ``base_answers`` (pair hash, model fingerprint, prompt format); every other
    prompt to ``recorded_answers``. An answer recorded with a larger ``max_new_tokens``, or that finished, serves
    any smaller limit.
    """

    def __init__(self, runtime, lm, max_new_tokens: int, replace_stored: bool = True):
        self.store = runtime.store
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        # False: a stored row for another prompt of the pair (e.g. recorded with re-ranked references) is kept, and
        # this prompt's answer goes to recorded_answers instead, so two callers never overwrite each other in turn.
        self.replace_stored = replace_stored
        import_answer_file(self.store, runtime.home, lm.fingerprint)

    def _usable(self, output: list[int], finished: bool, limit: int) -> list[int] | None:
        return usable_answer(output, finished, limit, self.max_new_tokens)

    def _lookup_own(self, requests: Sequence[AnswerRequest]) -> None:
        stored = [r for r in requests if r.pair_hash]
        if not stored:
            return
        with self.store.read() as session:
            rows = {row.pair_hash: row for row in session.scalars(select(BaseAnswer).where(
                BaseAnswer.fingerprint == self.lm.fingerprint, BaseAnswer.prompt_format == PROMPT_FORMAT,
                BaseAnswer.pair_hash.in_([r.pair_hash for r in stored])))}
        for r in stored:
            row = rows.get(r.pair_hash)
            if row is None:
                continue
            try:
                t = unpack(row.data, row.checksum, f"base answer of pair {r.pair_hash[:12]}")
            except CorruptError:
                continue  # recomputed and replaced
            if t["prompt_ids"].tolist() == r.prompt:
                r.output = self._usable(t["output_ids"].tolist(), row.finished, row.max_new_tokens)
            elif not self.replace_stored:
                r.pair_hash = None

    def lookup(self, requests: Sequence[AnswerRequest]) -> None:
        """Fill ``output`` of the requests whose prompts have a usable recorded answer."""
        self._lookup_own(requests)
        rest = [r for r in requests if r.output is None and not r.pair_hash]
        found = read_recordings(self.store, self.lm.fingerprint, [prompt_key(r.prompt) for r in rest])
        for r in rest:
            rec = found.get(prompt_key(r.prompt))
            if rec is not None:
                r.output = self._usable(rec.output, rec.finished, rec.max_new_tokens)

    def _finished(self, output: list[int]) -> bool:
        return bool(output) and output[-1] in set(self.lm.eos_ids)

    def _record_own(self, requests: Sequence[AnswerRequest]) -> None:
        """Replace the pairs' own-question answers: one transaction."""
        with self.store.write() as session:
            alive = set(session.scalars(select(Pair.hash).where(Pair.hash.in_([r.pair_hash for r in requests]))))
            ensure_model(session, self.lm.fingerprint, name=self.lm.ref.name, source=self.lm.ref.source,
                         hidden_size=self.lm.hidden_size, num_layers=self.lm.num_layers, info=self.lm.describe())
            for r in requests:
                if r.pair_hash not in alive:
                    continue
                session.execute(delete(BaseAnswer).where(
                    BaseAnswer.pair_hash == r.pair_hash, BaseAnswer.fingerprint == self.lm.fingerprint,
                    BaseAnswer.prompt_format == PROMPT_FORMAT))
                data, digest = pack({"prompt_ids": torch.tensor(r.prompt, dtype=torch.int32),
                                     "output_ids": torch.tensor(r.output, dtype=torch.int32)})
                session.add(BaseAnswer(pair_hash=r.pair_hash, fingerprint=self.lm.fingerprint,
                                       prompt_format=PROMPT_FORMAT, max_new_tokens=self.max_new_tokens,
                                       finished=self._finished(r.output), text=self.lm.decode(r.output), data=data,
                                       checksum=digest))

    def record(self, requests: Sequence[AnswerRequest]) -> None:
        """Keep the answers of ``requests`` (their ``output`` set): the pairs' own questions in one transaction,
        every other answer in a transaction of its own."""
        own = [r for r in requests if r.pair_hash and r.output is not None]
        if own:
            self._record_own(own)
        for r in requests:
            if not r.pair_hash and r.output is not None:
                record_answer(self.store, self.lm.fingerprint, Recording(
                    prompt_key(r.prompt), list(r.output), self._finished(r.output), self.max_new_tokens, r.about))

    def tag(self, requests: Sequence[AnswerRequest]) -> None:
        """Name the pair each recorded prompt asks about (recordings made before it was known)."""
        about = {prompt_key(r.prompt): r.about for r in requests if r.about and not r.pair_hash}
        tag_recordings(self.store, self.lm.fingerprint, about)

    def answers_about(self, hashes: Sequence[str]) -> list[list[int]]:
        """The recorded answers to rephrasings of the pairs ``hashes`` (training's variants, and queries retrieval
        was sure of): the base model's own wording about those pairs, which a new rephrasing often repeats."""
        by_pair = recordings_by_pair(self.store, self.lm.fingerprint, list(hashes))
        return [rec.output for h in dict.fromkeys(hashes) for rec in by_pair.get(h, [])]
