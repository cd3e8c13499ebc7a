"""Replayed answers (kvdb.replay): an engine whose batched passes are exact returns its own recorded answer to a
token-identical prompt without a model pass; never another engine's or another setting's; bounded; a damaged row is
decoded again. `kvdb build --states` and `kvdb train` answer the stored questions so their first ask replays."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import pytest

from kvdb import replay as replay_mod
from kvdb.replay import ReplayBook, engine_key, replay
from kvdb.runtime import Runtime

EOS = 2


def fake_engine(threads: int = 2, exact: bool = True) -> SimpleNamespace:
    return SimpleNamespace(name="llama_cpp", exact_batches=exact,
                           describe=lambda: {"engine": "llama_cpp", "model": "m" * 64, "n_threads": threads})


@pytest.fixture
def store(tmp_path):
    rt = Runtime.open(str(tmp_path / "home"))
    yield rt.store
    rt.store.dispose()


def test_an_answer_is_replayed_only_for_its_engine_settings_and_prompt(store):
    mine, other = engine_key(fake_engine(threads=2)), engine_key(fake_engine(threads=4))
    assert mine != other and len(mine) == 64
    ReplayBook(store, mine).record([1, 2, 3], [7, 8, EOS], 16, [EOS])
    assert ReplayBook(store, mine).lookup([1, 2, 3], 16) == [7, 8, EOS]
    assert ReplayBook(store, other).lookup([1, 2, 3], 16) is None  # another thread count: never restored
    assert ReplayBook(store, mine).lookup([1, 2, 3, 4], 16) is None  # another prompt
    assert ReplayBook(store, mine).lookup([1, 2], 16) is None  # a prefix of it


def test_engines_that_are_exact_only_up_to_ties_never_replay():
    assert engine_key(fake_engine(exact=False)) is None
    assert engine_key(SimpleNamespace(name="transformers", describe=lambda: {})) is None


def test_a_limit_is_served_only_by_an_answer_allowed_as_many_tokens_or_finished(store):
    book = ReplayBook(store, engine_key(fake_engine()))
    book.record([5], [9] * 16, 16, [EOS])  # cut by its limit of 16
    assert book.lookup([5], 8) == [9] * 8  # greedy's first 8 tokens do not depend on the limit
    assert book.lookup([5], 32) is None  # it might have gone on differently after 16
    book.record([6], [9, 9, EOS], 16, [EOS])  # finished
    assert book.lookup([6], 512) == [9, 9, EOS]


def test_recording_again_replaces_and_the_oldest_go_beyond_the_bound(store, monkeypatch):
    monkeypatch.setattr(replay_mod, "KEEP", 3)
    book = ReplayBook(store, engine_key(fake_engine()))
    for i in range(5):
        book.record([i], [i, EOS], 16, [EOS])
    book.record([4], [40, EOS], 16, [EOS])
    assert [book.lookup([i], 16) for i in range(5)] == [None, None, [2, EOS], [3, EOS], [40, EOS]]
    other = ReplayBook(store, engine_key(fake_engine(threads=8)))
    other.record([0], [0, EOS], 16, [EOS])  # another engine's bound is its own
    assert book.lookup([2], 16) == [2, EOS]


def test_a_damaged_answer_is_decoded_again_not_returned(store, tmp_path):
    book = ReplayBook(store, engine_key(fake_engine()))
    book.record([1], [3, 4, EOS], 16, [EOS])
    with sqlite3.connect(tmp_path / "home" / "kvdb.sqlite") as conn:
        (data,) = conn.execute("select data from engine_answers").fetchone()
        conn.execute("update engine_answers set data = ?", (data[:-4] + b"\0\0\0\0",))
    assert book.lookup([1], 16) is None
    assert replay(book, "llama_cpp", [1], 16) is None


def test_replay_reports_no_pass(store):
    book = ReplayBook(store, engine_key(fake_engine()))
    book.record([1, 2], [3, 4, EOS], 16, [EOS])
    got = replay(book, "llama_cpp", [1, 2], 16)
    assert got.output_ids == [3, 4, EOS]
    assert got.stats["replayed"] is True and got.stats["verify_steps"] == 0 and got.stats["new_tokens"] == 3
    assert got.stats["engine"] == "llama_cpp"


def test_doctor_checks_replayed_answers(tmp_path):
    """A replayed answer whose bytes were changed is reported, and --repair deletes it (it is decoded again)."""
    from sqlalchemy import update

    from kvdb.doctor import check
    from kvdb.store.models import EngineAnswer

    rt = Runtime.open(tmp_path / "home")
    book = ReplayBook(rt.store, engine_key(fake_engine()))
    book.record([1, 2, 3], [4, EOS], 16, [EOS])
    assert [f.status for f in check(rt).findings if f.check == "blobs"] == ["ok"]
    with rt.store.write() as session:
        session.execute(update(EngineAnswer).values(data=b"tampered"))
    found = [f for f in check(rt).findings if f.check == "blobs"]
    assert found and found[0].status == "problem" and "replayed answer" in found[0].detail
    assert [f.status for f in check(rt, repair=True).findings if f.check == "blobs"] == ["repaired"]
    assert book.lookup([1, 2, 3], 16) is None
    rt.store.dispose()
