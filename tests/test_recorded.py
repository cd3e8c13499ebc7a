"""Recorded answers in the store (kvdb.recorded): concurrent recorders lose nothing, each pair keeps its latest
answers, and an old home's answer file is imported once and renamed."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvdb import recorded
from kvdb.recorded import AnswerBook, AnswerRequest, answer_file, prompt_key, read_recordings, recordings_by_pair
from kvdb.runtime import Runtime

FINGERPRINT = "f" * 64
EOS = 2


def fake_lm() -> SimpleNamespace:
    """What recording an answer to a rephrasing reads of the base model: its fingerprint and end-of-turn ids."""
    return SimpleNamespace(fingerprint=FINGERPRINT, eos_ids=[EOS])


def pair_of(worker: int) -> str:
    return f"{worker:x}" * 64


def prompt_of(worker: int, i: int) -> list[int]:
    return [100 + worker, 200 + i, 7, 7]


def output_of(worker: int, i: int) -> list[int]:
    return [300 + worker, 400 + i, EOS]


def record_many(home: str, worker: int, count: int, barrier) -> None:
    """One process answering ``count`` rephrasings of its own pair, one recording at a time, as queries do."""
    rt = Runtime.open(home)
    book = AnswerBook(rt, fake_lm(), 12)
    barrier.wait(timeout=120)  # every process has its store open: they write at the same time
    for i in range(count):
        book.record([AnswerRequest(prompt=prompt_of(worker, i), output=output_of(worker, i),
                                   about=pair_of(worker))])
    rt.store.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, monkeypatch) -> str:
    """One SQLite home, or a fresh PostgreSQL database (skipped where no server can run), for every process."""
    if request.param == "postgresql":
        monkeypatch.setenv("KVDB_DATABASE_URL", request.getfixturevalue("pg_url"))
    return request.param


def test_concurrent_recorders_lose_no_recording(tmp_path, database):
    home, workers, count = str(tmp_path / "home"), 4, 12
    Runtime.open(home).store.dispose()  # created and migrated once, before the writers start
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=record_many, args=(home, w, count, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * workers
    rt = Runtime.open(home)
    keys = {prompt_key(prompt_of(w, i)): (w, i) for w in range(workers) for i in range(count)}
    got = read_recordings(rt.store, FINGERPRINT, list(keys))
    assert set(got) == set(keys)  # every recording of every process is there
    for key, (w, i) in keys.items():
        assert got[key].output == output_of(w, i) and got[key].pair == pair_of(w) and got[key].finished
    by_pair = recordings_by_pair(rt.store, FINGERPRINT)
    assert {h: len(v) for h, v in by_pair.items()} == {pair_of(w): count for w in range(workers)}


def test_each_pair_keeps_its_latest_answers(tmp_path, monkeypatch):
    rt = Runtime.open(tmp_path / "home")
    book = AnswerBook(rt, fake_lm(), 12)
    pair = pair_of(1)
    n = recorded.PER_PAIR + 4
    for i in range(n):
        book.record([AnswerRequest(prompt=prompt_of(1, i), output=output_of(1, i), about=pair)])
    kept = [output_of(1, i) for i in range(4, n)]
    assert book.answers_about([pair]) == kept  # the oldest four went, in the transactions that added the newest
    # Recording an answer to a prompt again makes it the latest; the now-oldest goes.
    book.record([AnswerRequest(prompt=prompt_of(1, 4), output=[9, 9, EOS], about=pair)])
    assert book.answers_about([pair]) == kept[1:] + [[9, 9, EOS]]
    # Answers about no pair have a bound of their own per model.
    monkeypatch.setattr(recorded, "UNPAIRED", 3)
    for i in range(5):
        book.record([AnswerRequest(prompt=prompt_of(2, i), output=output_of(2, i))])
    left = read_recordings(rt.store, FINGERPRINT, [prompt_key(prompt_of(2, i)) for i in range(5)])
    assert sorted(left) == sorted(prompt_key(prompt_of(2, i)) for i in (2, 3, 4))
    # A recording serves a later lookup of the same prompt (exactly, up to the limit it was recorded under).
    request = AnswerRequest(prompt=prompt_of(2, 4))
    book.lookup([request])
    assert request.output == output_of(2, 4)


def test_an_old_answer_file_is_imported_once(tmp_path):
    rt = Runtime.open(tmp_path / "home")
    lm = fake_lm()
    AnswerBook(rt, lm, 12).record([AnswerRequest(prompt=[1, 2, 5], output=[8, EOS])])  # before the file is seen
    path = answer_file(rt.home, FINGERPRINT)
    path.parent.mkdir(parents=True)
    old = {
        prompt_key([1, 2, 5]): {"output": [1, EOS], "finished": True, "max_new_tokens": 128},
        prompt_key([1, 2, 3]): {"output": [5, 6, EOS], "finished": True, "max_new_tokens": 128, "pair": pair_of(3)},
        prompt_key([1, 2, 4]): {"output": [5, 7], "finished": False, "max_new_tokens": 64},
        "damaged": {"output": "not ids"},
    }
    path.write_text(json.dumps(old))
    book = AnswerBook(rt, lm, 12)
    assert not path.exists() and Path(f"{path}.imported").is_file()
    got = read_recordings(rt.store, FINGERPRINT, [prompt_key([1, 2, 3]), prompt_key([1, 2, 4])])
    assert got[prompt_key([1, 2, 3])].output == [5, 6, EOS] and got[prompt_key([1, 2, 3])].pair == pair_of(3)
    assert got[prompt_key([1, 2, 4])].max_new_tokens == 64 and not got[prompt_key([1, 2, 4])].finished
    assert book.answers_about([pair_of(3)]) == [[5, 6, EOS]]
    # A recording the store already had wins over the file's entry for the same prompt.
    assert read_recordings(rt.store, FINGERPRINT, [prompt_key([1, 2, 5])])[prompt_key([1, 2, 5])].output == [8, EOS]
    # Imported once: a file that appears again later (an old kvdb wrote it) adds only what the store lacks.
    book.record([AnswerRequest(prompt=[1, 2, 3], output=[9, EOS], about=pair_of(3))])
    path.write_text(json.dumps(old))
    assert recorded.import_answer_file(rt.store, rt.home, FINGERPRINT) == 0
    assert read_recordings(rt.store, FINGERPRINT, [prompt_key([1, 2, 3])])[prompt_key([1, 2, 3])].output == [9, EOS]
    # An unfinished recording serves only requests for no more tokens than it was allowed.
    short, long = AnswerRequest(prompt=[1, 2, 4]), AnswerRequest(prompt=[1, 2, 4])
    AnswerBook(rt, lm, 64).lookup([short])
    AnswerBook(rt, lm, 128).lookup([long])
    assert short.output == [5, 7] and long.output is None


def test_a_damaged_answer_file_is_refused_and_kept(tmp_path):
    from kvdb.errors import StoreError

    rt = Runtime.open(tmp_path / "home")
    path = answer_file(rt.home, FINGERPRINT)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(StoreError, match="move it away"):
        AnswerBook(rt, fake_lm(), 12)
    assert path.read_text() == "{not json"  # never lost


def test_doctor_checks_recorded_answers(tmp_path):
    """A recorded answer whose bytes were changed is reported, and --repair deletes it (a later query records it
    again)."""
    from sqlalchemy import update

    from kvdb.doctor import check
    from kvdb.store.models import RecordedAnswer

    rt = Runtime.open(tmp_path / "home")
    AnswerBook(rt, fake_lm(), 12).record([AnswerRequest(prompt=[1, 2, 3], output=[4, EOS])])
    with rt.store.write() as session:
        session.execute(update(RecordedAnswer).values(data=b"tampered"))
    found = [f for f in check(rt).findings if f.check == "blobs"]
    assert found and found[0].status == "problem" and "recorded answer" in found[0].detail
    assert [f.status for f in check(rt, repair=True).findings if f.check == "blobs"] == ["repaired"]
    assert read_recordings(rt.store, FINGERPRINT, [prompt_key([1, 2, 3])]) == {}
