"""The engine interface and the loop's hardening: the cache keyword, failing draft sources, sliding-window caches,
generation settings that change greedy's choice, and a second engine (no KV cache, no layer features) that plugs
into the same loop."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from kvdb.decode import greedy_generate, speculative_generate
from kvdb.engines import Engine, as_engine
from kvdb.engines.transformers import TransformersEngine
from kvdb.errors import ModelError
from kvdb.lm import MIN_TRANSFORMERS, cache_keyword, check_transformers
from kvdb.sources import CopySource, ExactAnswerSource
from tests.test_decode import FeatureRecorder, Oracle, models, reference  # noqa: F401  (fixture)


# --- the KV cache keyword --------------------------------------------------------------------------------------


class Renamed(torch.nn.Module):
    """A causal LM whose forward takes its cache under another name (``past_key_values`` as before transformers
    5.24) or under none (``**kwargs`` only): whatever is not named is dropped, as such a forward would."""

    def __init__(self, model, keyword: str | None):
        super().__init__()
        self.inner, self.config, self.generation_config = model, model.config, model.generation_config
        inner_kw = cache_keyword(model)

        def forward(input_ids=None, use_cache=None, logits_to_keep=0, **kwargs):
            cache = kwargs.get(keyword) if keyword else None
            return self.inner(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep,
                              **{inner_kw: cache})

        if keyword == "past_key_values":
            def forward(input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0,  # noqa: F811
                        **kwargs):
                return self.inner(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep,
                                  **{inner_kw: past_key_values})

        self.forward = forward

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_the_cache_goes_under_the_keyword_the_forward_takes(models):
    model = models["llama"]
    assert cache_keyword(model) in ("cache", "past_key_values")
    old = Renamed(model, "past_key_values")
    assert cache_keyword(old) == "past_key_values"
    prompt = [9, 80, 81, 82, 83, 9, 80]
    ref = reference(model, prompt, 24, [0])
    # Under the wrong keyword the cache would be dropped and every verify pass would see only its own tokens.
    got = speculative_generate(old, prompt, 24, [0], [Oracle(prompt, ref, model.config.vocab_size, corrupt=0.3)])
    assert got.output_ids == ref
    with pytest.raises(ModelError, match="neither cache= nor past_key_values="):
        TransformersEngine(Renamed(model, None))
    with pytest.raises(ModelError, match="neither cache= nor past_key_values="):
        speculative_generate(Renamed(model, None), prompt, 4, [0])


def test_an_older_transformers_is_refused_at_model_load(monkeypatch, tmp_path):
    import transformers

    from kvdb.config import Home, ModelConfig
    from kvdb.lm import load_model

    check_transformers()  # the installed one is supported
    monkeypatch.setattr(transformers, "__version__", "5.23.0")  # takes the cache as past_key_values=
    with pytest.raises(ModelError, match=f"transformers>={MIN_TRANSFORMERS}.*found 5.23.0"):
        load_model(ModelConfig(source=str(tmp_path / "no-model")), Home.resolve(tmp_path))
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(ModelError, match="found 4.57.1"):
        check_transformers()


# --- failing draft sources -------------------------------------------------------------------------------------


class Exploding:
    """Proposes the right answer a few times (short drafts), then raises (in ``propose`` or in ``observe``)."""

    max_draft = 4

    def __init__(self, prompt, answer, where: str, after: int = 2):
        self.name, self.prompt, self.answer, self.where, self.after = f"boom-{where}", prompt, answer, where, after
        self.calls = 0

    def propose(self, context, k):
        self.calls += 1
        if self.where == "propose" and self.calls > self.after:
            raise RuntimeError("draft exploded")
        done = len(context) - len(self.prompt)
        return self.answer[done:done + k]

    def observe(self, context, n_accepted):
        if self.where == "observe" and self.calls > self.after:
            raise ValueError("observer exploded")


@pytest.mark.parametrize("where", ["propose", "observe"])
def test_a_source_that_raises_falls_back_to_plain_steps(models, where, caplog):
    model = models["qwen3"]
    prompt = [14, 15, 16, 17]
    ref = reference(model, prompt, 40, [0])
    source = Exploding(prompt, ref, where, after=2 if where == "propose" else 1)
    with caplog.at_level(logging.WARNING, logger="kvdb.decode"):
        got = speculative_generate(model, prompt, 40, [0], [source])
    assert got.output_ids == ref
    assert source.calls >= source.after + 1  # it did raise, and was not asked again after that
    assert source.calls == source.after + 1 or where == "observe"
    notices = got.stats["notices"]
    assert len(notices) == 1 and f"boom-{where}" in notices[0] and "answering without it" in notices[0]
    assert any(f"boom-{where}" in r.getMessage() for r in caplog.records)
    assert got.stats["accepted"] > 0  # its drafts before the failure were used


# --- caches that must be rolled back --------------------------------------------------------------------------


def _sliding_model(window: int | None):
    from transformers import AutoModelForCausalLM, GenerationConfig, MistralConfig

    config = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=window, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 1.0)  # decisive greedy choices
    model.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0)
    return model


def test_sliding_window_layers_roll_back_exactly_or_are_refused():
    from transformers.cache_utils import Cache

    model, full = _sliding_model(8), _sliding_model(None)
    if not hasattr(Cache, "activate_past_recording"):  # transformers releases that cannot roll such a cache back
        with pytest.raises(ModelError, match="sliding-window layers.*upgrade transformers"):
            speculative_generate(model, [5, 6, 7], 8, [0])
        return
    rng = random.Random(5)
    windowed = 0
    for _ in range(4):
        prompt = [rng.randrange(2, 300) for _ in range(rng.randint(3, 30))]
        ref = reference(model, prompt, 40, [0])
        windowed += ref != reference(full, prompt, 40, [0])  # the window really changes the answer
        for corrupt in (0.0, 0.3):
            oracle = Oracle(prompt, ref, 300, corrupt=corrupt, seed=len(prompt))
            got = speculative_generate(model, prompt, 40, [0], [oracle, CopySource([prompt])])
            assert got.output_ids == ref, (prompt, corrupt)
    assert windowed


def test_a_cache_that_cannot_roll_back_is_refused(monkeypatch):
    from transformers.cache_utils import Cache

    monkeypatch.setattr(Cache, "activate_past_recording", None, raising=False)  # as in releases without it
    with pytest.raises(ModelError, match="sliding-window layers.*upgrade transformers"):
        TransformersEngine(_sliding_model(8))
    TransformersEngine(_sliding_model(None))  # full attention needs no past recording


def test_a_hybrid_cache_with_recurrent_state_is_refused():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3NextConfig"):
        pytest.skip("this transformers has no Qwen3-Next")
    from transformers import AutoModelForCausalLM

    config = transformers.Qwen3NextConfig(
        vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"])
    model = AutoModelForCausalLM.from_config(config).eval()  # linear attention keeps a recurrent state per layer
    with pytest.raises(ModelError, match="LinearAttentionLayer.*cannot roll back"):
        speculative_generate(model, [1, 2, 3], 4, [0])


# --- generation settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("num_beams", 2), ("guidance_scale", 1.5), ("watermarking_config", {"greenlist_ratio": 0.25}),
    ("repetition_penalty", 1.3), ("no_repeat_ngram_size", 3), ("bad_words_ids", [[5]]), ("suppress_tokens", [5]),
    ("forced_eos_token_id", 0), ("min_new_tokens", 4), ("sequence_bias", {(5,): -1.0}), ("dola_layers", "low"),
])
def test_settings_that_change_greedy_are_refused(models, name, value):
    model = models["llama"]
    before = getattr(model.generation_config, name, None)
    setattr(model.generation_config, name, value)
    try:
        with pytest.raises(ModelError, match=name):
            speculative_generate(model, [1, 2, 3], 4, [0])
    finally:
        setattr(model.generation_config, name, before)
    assert speculative_generate(model, [1, 2, 3], 4, [0]).output_ids == reference(model, [1, 2, 3], 4, [0])


def test_min_length_counts_only_past_the_prompt(models):
    model = models["llama"]
    model.generation_config.min_length = 6
    try:
        assert speculative_generate(model, list(range(3, 13)), 4, [0]).output_ids  # shorter than the prompt: no-op
        with pytest.raises(ModelError, match="min_length"):
            speculative_generate(model, [1, 2, 3], 4, [0])
    finally:
        model.generation_config.min_length = None


# --- a second engine ----------------------------------------------------------------------------------------------


class NoCacheEngine:
    """Another engine on the same protocol: reruns the whole context every pass (no KV cache, no layer taps)."""

    name = "no-cache"

    def __init__(self, model):
        self.model = None  # no Hugging Face generate behind it: its greedy baseline is its own one-token steps
        self._lm = model
        self.vocab_size = model.config.vocab_size
        self.max_positions = model.config.max_position_embeddings
        self.ids: list[int] = []

    @property
    def n_positions(self) -> int:
        return len(self.ids)

    def describe(self):
        return {"engine": self.name}

    @torch.inference_mode()
    def _argmax(self, ids: list[int], last: int) -> list[int]:
        return self._lm(torch.tensor([ids])).logits[0, -last:].argmax(-1).tolist()

    def prefill(self, prompt_ids):
        self.ids = list(prompt_ids)
        return self._argmax(self.ids, 1)[0]

    def verify(self, tokens, pad=0):
        greedy = self._argmax(self.ids + list(tokens) + [tokens[-1]] * pad, len(tokens) + pad)[: len(tokens)]
        self.ids += list(tokens)
        return greedy

    def rollback(self, n_positions):
        del self.ids[n_positions:]


def test_a_second_engine_plugs_into_the_loop_and_feature_sources_are_skipped(models, caplog):
    model = models["llama"]
    engine = NoCacheEngine(model)
    assert isinstance(engine, Engine) and as_engine(engine) is engine
    prompt = [21, 22, 23, 24, 25]
    ref = reference(model, prompt, 30, [0])
    learned = FeatureRecorder(prompt, ref, model.config.vocab_size)  # wants layer features
    with caplog.at_level(logging.WARNING, logger="kvdb.decode"):
        got = speculative_generate(engine, prompt, 30, [0], [learned, ExactAnswerSource(prompt, ref)])
    assert got.output_ids == ref and got.stats["engine"] == "no-cache"
    assert not learned.seen and got.stats["verify_steps"] <= 2  # skipped; the recorded answer did the work
    assert "oracle" in got.stats["notices"][0] and "no-cache engine does not provide" in got.stats["notices"][0]
    assert engine.n_positions == len(prompt) + len(ref) - 1  # DecodeState's invariant
    plain = greedy_generate(engine, prompt, 30, [0])
    assert plain.output_ids == ref and plain.stats["drafted"] == 0 and plain.stats["engine"] == "no-cache"
    assert greedy_generate(model, prompt, 30, [0]).stats["engine"] == "transformers"


def test_pass_costs_are_measured_through_any_engine(models):
    from kvdb.passcost import measure_pass_plan

    plan = measure_pass_plan(NoCacheEngine(models["llama"]), max_q=4, context=8, reps=1)
    assert len(plan.costs) == 4 and plan.costs[0] == 1.0 and not plan.transposed_rows  # it has one kernel
