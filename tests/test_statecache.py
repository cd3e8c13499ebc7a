"""The prefix KV-state store: keyed by exact token ids and engine, bounded, corrupt files detected; and, on the tiny
GGUF, restored states give the logits recomputation gives, bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvdb.engines.statecache import (MAGIC, SUFFIX, PrefixState, StateCache, decode_state, describe_key,
                                     encode_state, prefill_with_states, prefix_keys, state_key)
from kvdb.errors import CorruptError

ENGINE_A = '{"engine":"llama_cpp","model":"aaa","n_threads":2}'
ENGINE_B = '{"engine":"llama_cpp","model":"aaa","n_threads":1}'


def fake(ids, engine=ENGINE_A, size=1000) -> PrefixState:
    rng = np.random.default_rng(len(ids))
    return PrefixState(tuple(ids), engine, rng.integers(0, 256, size, dtype=np.uint8).tobytes(), 7)


def test_prefix_keys_are_those_of_each_prefix_alone():
    ids = list(range(40))
    keys = prefix_keys(ENGINE_A, ids, [5, 17, 40, 41, 0])
    assert sorted(keys) == [5, 17, 40]
    for n, key in keys.items():
        assert key == prefix_keys(ENGINE_A, ids[:n], [n])[n]
    assert prefix_keys(ENGINE_B, ids, [5])[5] != keys[5]
    assert prefix_keys(ENGINE_A, [0, 1, 2, 3, 5], [5])[5] != keys[5]


def test_encode_decode_round_trip_and_corruption():
    state = fake([1, 2, 3])
    assert decode_state(encode_state(state)) == state
    data = bytearray(encode_state(state))
    data[-10] ^= 1
    with pytest.raises(CorruptError, match="checksum"):
        decode_state(bytes(data))
    with pytest.raises(CorruptError):
        decode_state(encode_state(state)[:-1])
    with pytest.raises(CorruptError):
        decode_state(b"something else entirely")
    with pytest.raises(CorruptError, match="header"):
        decode_state(MAGIC + (5).to_bytes(8, "little") + b"{bad}" + b"kv")


def test_get_only_for_the_same_tokens_and_engine(tmp_path):
    cache = StateCache(tmp_path)
    state = fake([1, 2, 3, 4])
    cache.put(state)
    assert cache.get([1, 2, 3, 4], ENGINE_A) == state
    assert cache.get([1, 2, 3, 5], ENGINE_A) is None
    assert cache.get([1, 2, 3], ENGINE_A) is None
    assert cache.get([1, 2, 3, 4], ENGINE_B) is None
    again = StateCache(tmp_path)  # a new process: from disk
    assert again.get([1, 2, 3, 4], ENGINE_A) == state
    assert again.get([1, 2, 3, 4], ENGINE_B) is None


def test_longest_prefix(tmp_path):
    cache = StateCache(tmp_path)
    cache.put(fake([1, 2]))
    cache.put(fake([1, 2, 3, 4]))
    assert cache.longest_prefix([1, 2, 3, 4, 5, 6], ENGINE_A).token_ids == (1, 2, 3, 4)
    assert cache.longest_prefix([1, 2, 3, 4, 5, 6], ENGINE_A, [2, 6]).token_ids == (1, 2)
    assert cache.longest_prefix([1, 2, 9], ENGINE_A).token_ids == (1, 2)
    assert cache.longest_prefix([9, 2, 3, 4], ENGINE_A) is None


def test_a_file_under_a_wrong_key_is_never_returned(tmp_path):
    """A state stored under another sequence's key (a collision, a copied file) is foreign: dropped, not used."""
    cache = StateCache(tmp_path)
    real = fake([1, 2, 3])
    forged_key = state_key(fake([1, 2, 4]))
    (tmp_path / f"{forged_key}{SUFFIX}").write_bytes(encode_state(real))
    assert StateCache(tmp_path).get([1, 2, 4], ENGINE_A) is None
    assert not (tmp_path / f"{forged_key}{SUFFIX}").exists()
    cache.put(real)
    assert cache.get([1, 2, 3], ENGINE_A) == real  # under its own key it is found


def test_corrupt_file_is_deleted_and_reported_as_a_miss(tmp_path, caplog):
    state = fake([5, 6, 7])
    StateCache(tmp_path).put(state)
    path = tmp_path / f"{state_key(state)}{SUFFIX}"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    cache = StateCache(tmp_path)
    assert cache.get([5, 6, 7], ENGINE_A) is None
    assert not path.exists() and cache.stats.dropped == 1
    assert "corrupt" in caplog.text


def test_memory_and_disk_are_bounded_lru(tmp_path):
    cache = StateCache(tmp_path, memory_bytes=2500, disk_bytes=3 * 1300)
    states = [fake([i, i + 1], size=1000) for i in range(5)]
    for i, s in enumerate(states):
        cache.put(s)
        path = tmp_path / f"{state_key(s)}{SUFFIX}"
        os.utime(path, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))  # distinct mtimes: put order
        cache._trim_disk()
    use = cache.usage()
    assert use["memory_entries"] == 2 and use["memory_bytes"] <= 2500
    assert use["disk_entries"] == 3 and use["disk_bytes"] <= 3 * 1300
    assert use["bytes_per_token"] == 500.0
    on_disk = {p.name for p in tmp_path.iterdir() if p.name.endswith(SUFFIX)}
    assert on_disk == {f"{state_key(s)}{SUFFIX}" for s in states[2:]}  # the oldest two went
    fresh = StateCache(tmp_path)
    assert fresh.get(list(states[0].token_ids), ENGINE_A) is None
    assert fresh.get(list(states[4].token_ids), ENGINE_A) == states[4]


def test_check_counts_and_fixes_stale_and_corrupt_files(tmp_path):
    cache = StateCache(tmp_path)
    for ids in ([1, 2], [3, 4], [5, 6]):
        cache.put(fake(ids))
    cache.put(fake([1, 2], engine=ENGINE_B))  # made before a setting changed
    broken = tmp_path / f"{state_key(fake([3, 4]))}{SUFFIX}"
    broken.write_bytes(broken.read_bytes()[:-3])
    moved = tmp_path / f"{'0' * 64}{SUFFIX}"
    (tmp_path / f"{state_key(fake([5, 6]))}{SUFFIX}").rename(moved)
    assert cache.check() == {"ok": 2, "other_engine": 0, "corrupt": 2}
    assert cache.check(ENGINE_A) == {"ok": 1, "other_engine": 1, "corrupt": 2}
    assert cache.check(ENGINE_A, fix=True) == {"ok": 1, "other_engine": 1, "corrupt": 2}
    assert cache.check(ENGINE_A) == {"ok": 1, "other_engine": 0, "corrupt": 0}
    assert StateCache(tmp_path).get([1, 2], ENGINE_A) == fake([1, 2])


def test_unwritable_directory_keeps_states_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = StateCache(blocker / "states")
    state = fake([1, 2])
    cache.put(state)
    assert cache.get([1, 2], ENGINE_A) == state


# ---- with the llama.cpp engine on the tiny GGUF ----

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (run `make install`)")
    from kvdb.engines.llama_cpp import LlamaCppEngine
    from tests.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    with LlamaCppEngine(path, n_ctx=512, n_threads=2) as e:
        yield e


def test_restored_states_give_bitwise_identical_logits(engine, tmp_path):
    rng = np.random.default_rng(3)
    system = [1, *rng.integers(3, engine.vocab_size, 30).tolist()]
    prompts = [system + rng.integers(3, engine.vocab_size, n).tolist() for n in (12, 25)]
    cont = rng.integers(3, engine.vocab_size, 6).tolist()
    expected = []
    for p in prompts:
        first = engine.prefill(p)
        expected.append((first, engine.verify_logits([first, *cont])))

    cache = StateCache(tmp_path)
    for p, (first, logits) in zip(prompts, expected):  # cold: computed, and the states stored
        assert prefill_with_states(engine, cache, p, boundaries=[len(system)]) == first
        assert np.array_equal(engine.verify_logits([first, *cont]), logits)
    assert cache.stats.hits == 1  # the second prompt found the system part
    assert cache.usage()["bytes_per_token"] > 0

    warm = StateCache(tmp_path)  # a new process: every state comes from disk
    for p, (first, logits) in zip(prompts, expected):
        assert prefill_with_states(engine, warm, p, boundaries=[len(system)]) == first
        assert engine.context_ids == p
        assert np.array_equal(engine.verify_logits([first, *cont]), logits)
    assert warm.stats.hits == 2 and warm.stats.misses == 0

    other = list(prompts[0])
    other[5] = (other[5] + 1) % engine.vocab_size  # one token differs inside the system part: nothing reused
    first = engine.prefill(other)
    logits = engine.verify_logits([first, *cont])
    hits = warm.stats.hits
    assert prefill_with_states(engine, warm, other, boundaries=[len(system)]) == first
    assert warm.stats.hits == hits
    assert np.array_equal(engine.verify_logits([first, *cont]), logits)


def test_states_of_another_engine_setting_are_not_used(engine, tmp_path):
    from kvdb.engines.llama_cpp import LlamaCppEngine

    prompt = [1, 40, 41, 42, 43, 44]
    cache = StateCache(tmp_path)
    prefill_with_states(engine, cache, prompt)
    with LlamaCppEngine(engine.path, n_ctx=512, n_threads=1) as one_thread:
        misses = cache.stats.misses
        first = prefill_with_states(one_thread, cache, prompt)
        assert cache.stats.misses == misses + 1
        assert first == one_thread.prefill(prompt)
    assert cache.usage()["disk_entries"] == 2


def test_a_state_llama_cpp_cannot_load_is_recomputed(engine, tmp_path, caplog):
    prompt = [1, 50, 51, 52, 53]
    expected = engine.prefill(prompt)
    cache = StateCache(tmp_path)
    good = prefill_with_states(engine, cache, prompt)
    state = cache.get(prompt, describe_key(engine.describe()))
    assert good == expected and state is not None
    cache.put(PrefixState(state.token_ids, state.engine, state.kv[:100], state.next_token))  # checksum-valid junk
    assert prefill_with_states(engine, cache, prompt) == expected
    assert engine.context_ids == prompt
    assert "did not load" in caplog.text


def test_background_writes_never_hold_the_caller_and_flush_waits_for_them(tmp_path, monkeypatch):
    import threading

    from kvdb.engines import statecache

    release, real_encode = threading.Event(), statecache.encode_state

    def slow_encode(state):
        assert release.wait(30), "the writer was never released"
        return real_encode(state)

    monkeypatch.setattr(statecache, "encode_state", slow_encode)
    cache = StateCache(tmp_path, background_writes=True)
    state = fake([1, 2, 3])
    cache.put(state)  # returns while the writer waits: the answer goes on
    assert cache.get([1, 2, 3], ENGINE_A) == state  # from memory at once
    assert not list(tmp_path.glob(f"*{SUFFIX}"))
    release.set()
    cache.flush()
    assert StateCache(tmp_path).get([1, 2, 3], ENGINE_A) == state  # another process finds it on disk


def test_without_save_whole_only_the_boundaries_are_kept(engine, tmp_path):
    prompt = [1, 50, 51, 52, 53, 54, 55]
    cache = StateCache(tmp_path)
    first = prefill_with_states(engine, cache, prompt, boundaries=[3], save_whole=False)
    assert first == engine.prefill(prompt)
    kept = [decode_state(p.read_bytes()).token_ids for p in tmp_path.glob(f"*{SUFFIX}")]
    assert kept == [tuple(prompt[:3])]
