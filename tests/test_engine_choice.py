"""Which engine answers (model.engine, KVDB_ENGINE, auto), where a prompt's recurring prefixes end, and prefix-state
reuse through the decoding loop: a restored prefix gives the tokens a full prefill gives."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvdb.config import Home, load_config
from kvdb.engines import engine_name, llama_cpp_installed
from kvdb.errors import ConfigError
from kvdb.lm import load_model
from kvdb.prompt import INSTRUCTION, Reference, build_messages, prefix_boundaries, prompt_ids
from tests.test_build_query import tiny_config  # noqa: F401  (fixture)


def _lm(gguf: bool, device: str = "cpu"):
    return SimpleNamespace(ref=SimpleNamespace(gguf_path=Path("m.gguf") if gguf else None),
                           device=torch.device(device))


def test_auto_picks_transformers_for_a_model_without_gguf():
    assert engine_name("auto", _lm(gguf=False)) == "transformers"


def test_auto_picks_transformers_on_a_gpu_even_for_a_gguf():
    assert engine_name("auto", _lm(gguf=True, device="cuda")) == "transformers"


def test_auto_picks_llama_cpp_for_a_gguf_on_the_cpu_where_installed(monkeypatch):
    monkeypatch.setattr("kvdb.engines.llama_cpp_installed", lambda: True)
    assert engine_name("auto", _lm(gguf=True)) == "llama_cpp"
    monkeypatch.setattr("kvdb.engines.llama_cpp_installed", lambda: False)
    assert engine_name("auto", _lm(gguf=True)) == "transformers"


def test_env_overrides_the_config_and_bad_names_are_refused(monkeypatch):
    assert engine_name("transformers", _lm(gguf=True)) == "transformers"
    monkeypatch.setenv("KVDB_ENGINE", "llama_cpp")
    assert engine_name("transformers", _lm(gguf=False)) == "llama_cpp"
    monkeypatch.setenv("KVDB_ENGINE", "vllm")
    with pytest.raises(ConfigError, match="KVDB_ENGINE is 'vllm'"):
        engine_name("auto", _lm(gguf=False))
    monkeypatch.delenv("KVDB_ENGINE")
    with pytest.raises(ConfigError, match="model.engine"):
        engine_name("llamacpp", _lm(gguf=False))


def test_prefix_boundaries_end_where_the_recurring_parts_end(tiny_config):  # noqa: F811
    lm = load_model(load_config(tiny_config).model, Home.resolve(None))
    refs = [Reference("What is a B-tree?", "A balanced search tree."), Reference("What is a heap?", "A tree.")]
    ids = prompt_ids(lm, "How do B-trees stay balanced?", refs)
    cuts = prefix_boundaries(lm, "How do B-trees stay balanced?", refs, ids)
    assert len(cuts) == 3 and 0 < cuts[0] < cuts[1] < cuts[2] < len(ids)
    # The last boundary is shared by another question retrieving the same pairs, the middle one by a question whose
    # top pair is the same, the first by any prompt with references.
    other = prompt_ids(lm, "Why are B-tree nodes wide?", refs)
    assert other[:cuts[2]] == ids[:cuts[2]]
    same_top = prompt_ids(lm, "Why are B-tree nodes wide?", refs[:1] + [Reference("What is a trie?", "A tree.")])
    assert same_top[:cuts[1]] == ids[:cuts[1]] and same_top[:cuts[2]] != ids[:cuts[2]]
    third = prompt_ids(lm, "What is entropy?", [Reference("What is entropy?", "Disorder.")])
    assert third[:cuts[0]] == ids[:cuts[0]] and third[:cuts[1]] != ids[:cuts[1]]
    system = lm.chat_ids(build_messages("x", refs)[:1], add_generation_prompt=False)
    assert ids[:cuts[2]] == system[:cuts[2]] and INSTRUCTION in lm.decode(ids[:cuts[0]])


@pytest.mark.skipif(not llama_cpp_installed(), reason="llama-cpp-python is not installed (run `make install`)")
def test_prefix_reuse_in_the_loop_gives_the_full_prefill_tokens(tmp_path):
    from kvdb.decode import speculative_generate
    from kvdb.engines.llama_cpp import LlamaCppEngine
    from kvdb.engines.statecache import PrefixReuse, StateCache
    from kvdb.sources import CopySource
    from tests.tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    rng = np.random.default_rng(3)
    shared = [1, *rng.integers(3, 300, 40).tolist()]
    prompts = [shared + rng.integers(3, 300, n).tolist() for n in (7, 12)]
    cache = StateCache(tmp_path / "states", memory_bytes=1 << 20, disk_bytes=64 << 20)
    with LlamaCppEngine(gguf, n_ctx=256, n_threads=2) as engine:
        for prompt in prompts:
            expected = engine.greedy(prompt, 24)
            for _ in range(2):  # the second time the whole prompt's state is restored
                out = speculative_generate(engine, prompt, 24, [], [CopySource([expected[5:]])],
                                           reuse=PrefixReuse(cache, (len(shared),)))
                assert out.output_ids == expected
    assert cache.stats.hits == 3  # the second prompt found the shared prefix, then each prompt its own state
    assert cache.usage()["bytes_per_token"] > 0
