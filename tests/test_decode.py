"""Speculative decoding is lossless: whatever the drafts, the output equals plain greedy `generate` token for token."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from kvdb.decode import GenerationResult, greedy_generate, speculative_generate
from kvdb.engines.transformers import TransformersEngine
from kvdb.errors import ModelError, ValidationError
from kvdb.policy import DraftPolicy, expected_tokens
from kvdb.sources import CopySource, ExactAnswerSource, Proposal
from tests.tiny import make_model

ARCHS = ("llama", "qwen3")


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    # Tiny models gain nothing from threads, and on a busy 2-core machine a second thread makes each pass ~50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for seed, arch in enumerate(ARCHS):
        folder = make_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, seed=seed)
        model = AutoModelForCausalLM.from_pretrained(folder)
        model.eval()
        out[arch] = model
    yield out
    torch.set_num_threads(threads)


def reference(model, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """What plain HF greedy decoding returns (new tokens only)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos[0])
    return out[0, len(prompt):].tolist()


# --- draft sources used only by the tests ----------------------------------------------------------------------


class Oracle:
    """Knows the right answer; proposes it with a chosen share of tokens corrupted (0.0 = perfect drafts)."""

    def __init__(self, prompt, answer, vocab, corrupt=0.0, seed=0, name="oracle"):
        self.name, self.prompt, self.answer, self.vocab = name, prompt, answer, vocab
        self.corrupt = corrupt
        self.rng = random.Random(seed)

    def propose(self, context, k):
        done = len(context) - len(self.prompt)
        draft = list(self.answer[done:done + k])
        for i in range(len(draft)):
            if self.rng.random() < self.corrupt:
                draft[i] = (draft[i] + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
        return draft


class AlwaysWrong:
    """Always proposes k tokens whose first one is wrong (so every draft is rolled back whole)."""

    name = "wrong"

    def __init__(self, prompt, answer, vocab):
        self.prompt, self.answer, self.vocab = prompt, answer, vocab

    def propose(self, context, k):
        done = len(context) - len(self.prompt)
        if done >= len(self.answer):
            return [0] * k
        return [(self.answer[done] + 1 + i) % self.vocab for i in range(k)]


class FixedK(DraftPolicy):
    """Verifies every proposal at a fixed (or random) length, whatever its record: exercises the engine alone."""

    def __init__(self, k=5, seed=None):
        super().__init__()
        self.k, self.rng = k, (random.Random(seed) if seed is not None else None)

    def ask(self, remaining):
        k = self.rng.randint(1, self.k) if self.rng else self.k
        return [(i, min(k, remaining - 1)) for i in range(len(self._sources))] if remaining > 1 else []

    def promise(self, index):
        return 2.0

    def judge(self, index, draft):
        return len(draft), 2.0


# --- losslessness ------------------------------------------------------------------------------------------------


def _cases(models, n_per_arch=15, seed=1234):
    """Random prompts, lengths and budgets; some cases stop on a token the model emits often (early eos)."""
    rng = random.Random(seed)
    cases = []
    for arch in ARCHS:
        model = models[arch]
        vocab = model.config.vocab_size
        own_eos = [model.generation_config.eos_token_id]
        for i in range(n_per_arch):
            prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))]
            max_new = 1 if i % 8 == 0 else rng.randint(1, 64)
            eos = own_eos
            if i % 3 == 1:
                free = reference(model, prompt, 48, own_eos)
                common = Counter(free[1:]).most_common(1)
                if common:
                    eos = [common[0][0], own_eos[0]]  # a token the model emits often: the answer ends early
            cases.append((arch, prompt, max_new, eos))
    return cases


def _source_kinds(prompt, ref, vocab, rng):
    corrupted = [t if rng.random() > 0.25 else rng.randrange(vocab) for t in ref]
    return {
        "none": ([], None),
        "copy-perfect": ([CopySource([prompt[-1:] + ref])], None),
        "copy-random": ([CopySource([[rng.randrange(vocab) for _ in range(200)]], min_match=1)], None),
        "copy-corrupted": ([CopySource([prompt[-1:] + corrupted])], None),
        "exact": ([ExactAnswerSource(prompt, ref)], None),
        "oracle-corrupted": ([Oracle(prompt, ref, vocab, corrupt=0.2, seed=len(prompt))], FixedK(8, seed=len(ref))),
        "oracle-corrupted-policy": ([Oracle(prompt, ref, vocab, corrupt=0.1, seed=len(prompt))], None),
        "always-wrong-no-backoff": ([AlwaysWrong(prompt, ref, vocab)], FixedK(5)),
        "mixed": ([ExactAnswerSource(prompt, corrupted), CopySource([prompt[-1:] + ref]),
                   Oracle(prompt, ref, vocab, corrupt=0.5, seed=7)], None),
        # A measured table where long passes are cheap: short drafts are verified in padded passes.
        "oracle-padded": ([Oracle(prompt, ref, vocab, corrupt=0.3, seed=3)],
                          DraftPolicy(pass_costs=[1.0, 3.0, 3.0, 3.0, 1.2, 3.0, 1.3, 1.4])),
        # Passes of 2-12 inputs multiplied as (W @ x^T)^T (KERNEL_ROWS), a one-token step padded to two.
        "transposed-kernels": ([Oracle(prompt, ref, vocab, corrupt=0.3, seed=5)],
                               DraftPolicy(pass_costs=[1.0, 0.9, 1.0, 0.95, 1.1, 1.2, 1.3, 1.35])),
    }


KERNEL_ROWS = {"transposed-kernels": frozenset(range(2, 13))}  # kvdb.kernels, run by the engine


def test_speculative_output_equals_greedy_generate(models):
    rng = random.Random(99)
    cases = _cases(models)
    assert len(cases) >= 30
    early_eos = 0
    totals = Counter()
    for arch, prompt, max_new, eos in cases:
        model = models[arch]
        ref = reference(model, prompt, max_new, eos)
        early_eos += len(ref) < max_new
        for kind, (sources, policy) in _source_kinds(prompt, ref, model.config.vocab_size, rng).items():
            engine = TransformersEngine(model, transposed_rows=KERNEL_ROWS.get(kind, ()))
            got = speculative_generate(engine, prompt, max_new, eos, sources, policy)
            assert got.output_ids == ref, (arch, kind, len(prompt), max_new, eos)
            s = got.stats
            assert s["new_tokens"] == len(got.output_ids) and s["engine"] == "transformers"
            assert not s["notices"] and engine.n_positions == len(prompt) + len(ref) - 1
            assert 0 <= s["accepted"] <= s["drafted"]
            assert s["accepted"] <= s["new_tokens"]
            assert s["verify_steps"] <= max(len(ref) - 1, 0)  # never more forward passes than greedy
            assert sum(c["drafted"] for c in s["sources"].values()) == s["drafted"]
            assert sum(c["accepted"] for c in s["sources"].values()) == s["accepted"]
            totals[kind, "accepted"] += s["accepted"]
            totals[kind, "drafted"] += s["drafted"]
            if kind in ("exact",) and len(ref) >= 3:
                assert s["verify_steps"] < s["new_tokens"] - 1  # acceleration, structurally
            if kind == "none":
                assert s["drafted"] == 0 and s["verify_steps"] == max(len(ref) - 1, 0)
    assert early_eos >= 3  # the eos path was exercised
    # the drafts did what they were built to do: rejected whole, accepted in part, accepted in full
    assert totals["always-wrong-no-backoff", "drafted"] > 100 and totals["always-wrong-no-backoff", "accepted"] == 0
    assert 0 < totals["oracle-corrupted", "accepted"] < totals["oracle-corrupted", "drafted"]
    assert totals["copy-perfect", "accepted"] > 0.5 * totals["copy-perfect", "drafted"] > 0
    assert totals["exact", "accepted"] == totals["exact", "drafted"] > 0


def test_greedy_generate_baseline(models):
    model = models["llama"]
    prompt = list(range(5, 25))
    eos = [model.generation_config.eos_token_id]
    got = greedy_generate(model, prompt, 20, eos)
    assert isinstance(got, GenerationResult)
    assert got.output_ids == reference(model, prompt, 20, eos)
    spec = speculative_generate(model, prompt, 20, eos, [])
    assert set(got.stats) == set(spec.stats)
    assert got.stats["new_tokens"] == len(got.output_ids)
    assert got.stats["drafted"] == got.stats["accepted"] == 0
    assert 0 < got.stats["time_to_first_token"] <= got.stats["seconds"]


def test_stops_at_eos_inside_an_accepted_draft_and_at_the_limit(models):
    model = models["qwen3"]
    prompt = [7, 8, 9, 10, 11]
    free = reference(model, prompt, 40, [0])
    eos = [free[10]]  # the 11th token (or an earlier occurrence of it) ends the answer
    ref = reference(model, prompt, 40, eos)
    assert ref[-1] == eos[0] and len(ref) <= 11
    got = speculative_generate(model, prompt, 40, eos, [ExactAnswerSource(prompt, free)])
    assert got.output_ids == ref
    for limit in (1, 2, 5, len(free) - 1):
        got = speculative_generate(model, prompt, limit, [0], [ExactAnswerSource(prompt, free)])
        assert got.output_ids == free[:limit]
        assert got.stats["new_tokens"] == limit


def test_on_tokens_streams_exactly_the_output(models, monkeypatch):
    import kvdb.engines.transformers

    def no_hooks(*_args):
        raise AssertionError("hooks registered although no source wants features")

    monkeypatch.setattr(kvdb.engines.transformers, "LayerTap", no_hooks)
    model = models["llama"]
    prompt = [12, 40, 41, 99, 5, 6]
    eos = [model.generation_config.eos_token_id]
    ref = reference(model, prompt, 50, eos)
    for sources in ([], [ExactAnswerSource(prompt, ref)], [Oracle(prompt, ref, model.config.vocab_size, 0.3)]):
        chunks: list[list[int]] = []
        got = speculative_generate(model, prompt, 50, eos, sources, on_tokens=chunks.append)
        assert [t for c in chunks for t in c] == got.output_ids == ref
        assert all(chunks)
        if sources and isinstance(sources[0], ExactAnswerSource) and len(ref) > 2:
            assert len(chunks[1]) > 1  # accepted runs arrive together, not token by token


class ObservedExact(ExactAnswerSource):
    def __init__(self, *args):
        super().__init__(*args)
        self.feedback = []

    def observe(self, context, n_accepted):
        self.feedback.append((len(context), n_accepted))


def test_exact_answer_makes_few_verify_steps(models):
    model = models["llama"]
    prompt = [30, 31, 32]
    ref = reference(model, prompt, 64, [0])
    source = ObservedExact(prompt, ref)
    got = speculative_generate(model, prompt, 64, [0], [source])
    assert got.output_ids == ref
    assert got.stats["verify_steps"] <= 2
    # feedback after prefill (nothing drafted yet) and after each step that did not end the answer
    assert source.feedback[0] == (len(prompt) + 1, None)
    assert all(n is not None and n > 0 for _, n in source.feedback[1:])
    assert got.stats["accepted"] == len(ref) - 1 - got.stats["verify_steps"]  # every step adds one own token


def test_always_wrong_drafts_back_off(models):
    model = models["qwen3"]
    prompt = [50, 51, 52]
    ref = reference(model, prompt, 64, [0])
    got = speculative_generate(model, prompt, 64, [0], [AlwaysWrong(prompt, ref, model.config.vocab_size)])
    assert got.output_ids == ref
    assert got.stats["sources"]["wrong"]["proposals"] <= 8  # mostly plain steps
    assert got.stats["drafted"] <= 20


# --- features for learned drafts ---------------------------------------------------------------------------------


class FeatureRecorder(Oracle):
    wants_features = (1, 3)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def observe(self, context, n_accepted, features):
        self.seen.append((list(context), n_accepted, {k: v.clone() for k, v in features.items()}))


def test_sources_get_features_of_accepted_positions(models):
    model = models["llama"]
    hidden = model.config.hidden_size
    prompt = [60, 61, 62, 63, 64, 65, 66]
    ref = reference(model, prompt, 30, [0])
    rec = FeatureRecorder(prompt, ref, model.config.vocab_size, corrupt=0.2, seed=3)
    got = speculative_generate(model, prompt, 30, [0], [rec])
    assert got.output_ids == ref
    assert len(rec.seen) == got.stats["verify_steps"]  # after prefill and every step but the last
    context0, n0, f0 = rec.seen[0]
    assert n0 is None and set(f0) == {1, 3} and f0[1].shape == (len(prompt), hidden)
    covered = len(prompt)
    for context, n, feats in rec.seen[1:]:
        rows = (n or 0) + 1  # the previous last token + the accepted draft (n is None after a plain step)
        assert feats[1].shape == feats[3].shape == (rows, hidden)
        covered += rows
        assert covered == len(context) - 1  # every context token but the last has its features, once
    assert not any(layer._forward_hooks for layer in model.get_decoder().layers)  # hooks removed afterwards
    # the features are the base model's own hidden states (layer outputs before the final norm)
    full = rec.seen[-1][0]
    with torch.inference_mode():
        states = model(torch.tensor([full[:-1]]), output_hidden_states=True).hidden_states
    stitched = {layer: torch.cat([f[layer] for _, _, f in rec.seen]) for layer in (1, 3)}
    for layer in (1, 3):
        torch.testing.assert_close(stitched[layer], states[layer][0], atol=1e-4, rtol=1e-4)


# --- sources and policy ------------------------------------------------------------------------------------------


def test_copy_source_continues_the_longest_matching_suffix():
    seqs = [[1, 2, 3, 4, 5, 6, 7], [9, 2, 3, 8, 8, 8], [5, 5, 2, 3, 4, 10, 11, 12]]
    src = CopySource(seqs)
    assert src.propose([0, 2, 3], 3) == [4, 5, 6]  # "2 3" first occurs in sequence 0
    assert src.propose([9, 2, 3], 2) == [8, 8]  # "9 2 3" is longer, only in sequence 1
    assert src.propose([5, 2, 3, 4], 10) == [10, 11, 12]  # "5 2 3 4" beats "2 3 4"; the rest of the sequence
    assert src.propose([0, 4, 2], 4) == []  # nothing of 2+ tokens matches
    assert src.propose([1, 2, 3, 4, 5, 6, 7], 4) == []  # a match at the very end has nothing to propose
    assert src.propose([4], 3) == []  # shorter than min_match
    assert CopySource(seqs, min_match=1).propose([0, 11], 5) == [12]
    assert src.propose([2, 3], 0) == []
    long = list(range(100, 140))
    assert CopySource([long]).propose([7, *long[:20]], 4) == long[20:24]  # longest suffix capped at max_match
    with pytest.raises(ValidationError):
        CopySource(seqs, min_match=0)


def test_copy_source_keys_its_proposals_and_can_search_the_context():
    src = CopySource([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    short, long = src.propose([0, 1, 2], 4), src.propose([1, 2, 3, 4, 5, 6, 7, 8], 2)
    assert short == [3, 4, 5, 6] and short.key == ("seq", 2)
    assert long == [9, 10] and long.key == ("seq", 8) and long.prior > short.prior
    ctx = CopySource([[50, 51, 52]], search_context=True)
    assert ctx.propose([7, 8, 9, 1, 7, 8], 3) == [9, 1, 7]  # "7 8" seen before in the context itself
    assert ctx.propose([7, 8, 9, 1, 7, 8], 3).key == ("ctx", 2)
    assert ctx.propose([7, 8, 9, 1, 7, 8, 5, 7, 8], 2) == [5, 7]  # the latest occurrence, indexed incrementally
    assert ctx.propose([3, 50, 51, 4, 50, 51], 1) == [52]  # a new context starts over; stored sequences win ties
    assert CopySource([[50, 51, 52]]).propose([7, 8, 9, 1, 7, 8], 3) == []  # off by default


def test_exact_answer_source_proposes_the_rest_until_divergence():
    src = ExactAnswerSource([1, 2, 3], [10, 11, 12, 13, 2])
    assert src.propose([1, 2, 3], 3) == [10, 11, 12]
    assert src.propose([1, 2, 3, 10, 11], 64) == [12, 13, 2]
    assert src.propose([1, 2, 3, 10, 99], 4) == []  # diverged
    assert src.propose([1, 2, 4], 4) == []  # another prompt
    assert src.propose([1, 2], 4) == []
    assert src.propose([1, 2, 3, 10, 11, 12, 13, 2], 4) == []  # answer complete
    assert src.max_draft >= 64


def test_policy_cost_model():
    assert expected_tokens(0.0, 8) == 1.0
    assert expected_tokens(1.0, 8) == 9.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    policy = DraftPolicy(token_cost=1 / 24, draft_overhead=0.5)
    assert policy.cost(0) == 1.0 and policy.cost(16) == pytest.approx(1.5 + 16 / 24)
    copy, exact = CopySource([[1, 2, 3]]), ExactAnswerSource([1], [2])
    policy.start([copy, exact], torch.device("cpu"))
    assert policy.ask(200) == [(0, 16), (1, 128)]  # lookups are always asked, for as much as they may give
    assert policy.ask(1) == []  # one token left: a plain step
    assert max(k for _, k in policy.ask(5)) == 4  # never draft past max_new_tokens
    k_exact, gain_exact = policy.judge(1, list(range(100)))
    assert k_exact == 100 and gain_exact > 8  # a recorded answer is verified whole
    weak = Proposal(range(16), key=("seq", 2), prior=0.55)
    strong = Proposal(range(16), key=("seq", 8), prior=0.85)
    k_weak, k_strong = policy.judge(0, weak)[0], policy.judge(0, strong)[0]
    assert 1 <= k_weak <= 4 < 8 <= k_strong  # a long match earns a long draft
    for _ in range(3):  # full acceptance grows the estimate, and the draft
        policy.update(0, Proposal(range(k_weak), ("seq", 2), 0.45), k_weak)
    assert policy.judge(0, weak)[0] > k_weak
    for _ in range(policy.patience):  # outright rejection: the key sleeps, other keys do not
        policy.update(0, Proposal(range(3), ("seq", 2), 0.45), 0)
    assert policy.judge(0, weak) == (0, 1.0)
    assert policy.judge(0, strong)[0] >= 8
    for _ in range(policy.retry_after):
        policy.update(None, [], 0)
    assert 1 <= policy.judge(0, weak)[0] <= policy.probe_k  # retried with a short probe
    dear = DraftPolicy(token_cost=1.0)  # drafting is expensive: mediocre drafts are not verified
    dear.start([copy], torch.device("cpu"))
    assert dear.judge(0, Proposal(range(8), "x", 0.6)) == (0, 1.0)


def test_policy_asks_a_costly_source_only_when_it_pays():
    class Costly:
        name = "learned"

        def propose(self, context, k):
            return [1] * k

    learned = Costly()
    policy = DraftPolicy()
    policy.start([learned], torch.device("cpu"))
    assert policy.ask(50) and policy.promise(0) > 1  # the prior says try it
    for _ in range(policy.patience):
        policy.update(0, [1, 1, 1], 0)
    assert policy.ask(50) == [] and policy.promise(0) == 0.0  # asleep: not even asked
    for _ in range(policy.retry_after):
        policy.update(None, [], 0)
    assert policy.ask(50) == [(0, policy.probe_k)]


def test_policy_pads_to_the_cheapest_measured_pass():
    policy = DraftPolicy(pass_costs=[1.0, 1.66, 2.1, 1.45, 1.5, 1.6, 1.7, 1.9])
    policy.start([], torch.device("cpu"))
    assert (policy.cost(0), policy.pass_length(0)) == (1.0, 1)
    assert (policy.cost(1), policy.pass_length(1)) == (1.45, 4)  # q=2 is dearer than q=4: pad
    assert (policy.cost(3), policy.pass_length(3)) == (1.45, 4)
    assert (policy.cost(4), policy.pass_length(4)) == (1.5, 5)
    # Beyond the table: the slope of its upper half (q=4..8: 0.1125 per token), not of its noisy last pair (0.2).
    assert policy.pass_length(10) == 11 and policy.cost(10) == pytest.approx(1.9 + 0.1125 * 3)
    assert policy.cost(2, draft_cost=0.1) == pytest.approx(1.45 + 0.2)


def test_policy_corrects_the_table_by_the_passes_it_times():
    """Passes of this answer that cost more than the table says (a long prompt, a busy machine) make drafts dearer,
    so a marginal draft is no longer verified; cheaper ones make them cheaper. Nothing changes before plain steps
    give the unit."""
    table = [1.0, 1.2, 1.3, 1.4, 1.5]
    policy = DraftPolicy(pass_costs=table)
    policy.start([], torch.device("cpu"))
    assert policy.cost(3) == pytest.approx(1.4) and policy.best_k(0.45, 4)[0] >= 1  # worth a try by the table
    policy.observe_pass(4, 0.5)  # no plain step timed yet: no unit, no correction
    assert policy.cost(3) == pytest.approx(1.4)
    for _ in range(3):
        policy.observe_pass(1, 0.1)
    for _ in range(4):
        policy.observe_pass(4, 0.2)  # observed extra 1.0 a pass where the table says 0.4
    scale = (1.5 + 4.0 + 4 * 1.0) / (1.5 + 5 * 0.4)  # the first pass counts too, once the unit is known
    assert policy.cost(3) == pytest.approx(1 + 0.4 * scale) and policy.cost(1) == pytest.approx(1 + 0.2 * scale)
    assert policy.cost(0) == 1.0 and policy.best_k(0.45, 4) == (0, 1.0)
    policy.start([], torch.device("cpu"))  # a new answer starts from the table again
    assert policy.cost(3) == pytest.approx(1.4)
    for _ in range(3):
        policy.observe_pass(1, 0.1)
    for _ in range(16):
        policy.observe_pass(4, 0.1)  # as cheap as a plain step
    assert policy.cost(3) == pytest.approx(1 + 0.4 * 0.25)  # the scale never falls below a quarter


def test_measured_pass_costs_are_relative_to_one_token(models):
    from kvdb.passcost import measure_pass_costs, measure_pass_plan

    costs = measure_pass_costs(models["llama"], max_q=6, context=16, reps=1)
    assert len(costs) == 6 and costs[0] == 1.0 and all(c > 0 for c in costs)
    plan = measure_pass_plan(models["llama"], max_q=6, context=16, reps=1)
    assert len(plan.costs) == 6 and plan.costs[0] == 1.0 and plan.transposed_rows <= set(range(2, 7))
    assert "forward" not in vars(models["llama"].lm_head)  # the kernels are only swapped while timing


def test_a_padded_plain_step_is_the_unit_drafts_must_beat():
    policy = DraftPolicy(pass_costs=[1.0, 0.9, 1.0, 0.95, 1.2])
    policy.start([], torch.device("cpu"))
    assert policy.pass_length(0) == 2 and policy.cost(0) == pytest.approx(0.9)  # a plain step runs 2 inputs
    assert policy.cost(1) == pytest.approx(0.9)
    assert policy.gain(0.0, 1) == pytest.approx(1.0)  # a draft that is never right gains nothing...
    assert policy.best_k(0.05, 4) == (0, 1.0)  # ...and a nearly useless one is not verified
    k, gain = policy.best_k(0.6, 4)
    assert k == 3 and gain == pytest.approx(expected_tokens(0.6, 3) * 0.9 / 0.95)


def test_policy_weighs_what_a_draft_costs_to_make():
    class Slow:
        name = "learned"
        prior = 0.3  # e.g. the held-out agreement of a weak trained draft
        token_cost = 0.13  # ~4 of 30 layers per drafted token

        def propose(self, context, k):
            return [1] * k

    slow = Slow()
    policy = DraftPolicy()
    policy.start([slow], torch.device("cpu"))
    assert policy.ask(50) == [] and policy.promise(0) == 1.0  # slower than plain steps: never asked
    slow.prior = 0.9
    policy.start([slow], torch.device("cpu"))
    assert policy.ask(50) and policy.promise(0) > 1.5  # a good draft is worth its cost
    free, dear = policy.gain(0.6, 4), policy.gain(0.6, 4, draft_cost=0.13)
    assert dear == pytest.approx(expected_tokens(0.6, 4) / policy.cost(4, 0.13)) and dear < free


def test_draft_only_generate_is_the_sources_own_greedy_continuation(models):
    from kvdb.decode import draft_only_generate

    prompt = [5, 6, 7]
    answer = [11, 12, 13, 14, 0, 15]  # 0 is eos
    out = draft_only_generate(ExactAnswerSource(prompt, answer), prompt, 20, [0], chunk=2)
    assert out.output_ids == [11, 12, 13, 14, 0] and out.stats["verify_steps"] == 0
    assert draft_only_generate(ExactAnswerSource(prompt, answer), prompt, 3, [0]).output_ids == [11, 12, 13]
    assert draft_only_generate(CopySource([]), prompt, 5, [0]).output_ids == []  # no guess: an empty answer


def test_input_checks(models):
    model = models["llama"]
    with pytest.raises(ValidationError):
        speculative_generate(model, [], 5, [0])
    with pytest.raises(ValidationError):
        speculative_generate(model, [1, 2], 0, [0])
    model.generation_config.repetition_penalty = 1.3
    try:
        with pytest.raises(ModelError, match="repetition_penalty"):
            speculative_generate(model, [1, 2], 4, [0])
    finally:
        model.generation_config.repetition_penalty = 1.0


def test_copy_priors_follow_origin_and_retrieval_confidence():
    from kvdb.sources import UNSURE_COPY_PRIORS

    seq = [9, 1, 2, 3, 4, 5, 6]
    sure, unsure = CopySource([seq]), CopySource([seq], priors=UNSURE_COPY_PRIORS)
    a, b = sure.propose([7, 1, 2], 4), unsure.propose([7, 1, 2], 4)
    assert a == b == [3, 4, 5, 6] and a.key == b.key == ("seq", 2)
    assert b.prior < a.prior  # references retrieval was not sure of are less likely to be copied


def test_padding_stops_at_the_models_last_position(models, monkeypatch):
    from kvdb import decode

    model = models["llama"]
    prompt, max_new = list(range(5, 45)), 12
    eos = [599]
    ref = reference(model, prompt, max_new, eos)
    seen = []
    real_verify = decode.verify

    def spy(engine, state, draft, pad=0):
        assert engine.n_positions == len(state.prompt_ids) + len(state.output) - 1  # DecodeState's invariant
        seen.append(engine.n_positions + len(draft) + 1 + pad)
        return real_verify(engine, state, draft, pad)

    monkeypatch.setattr(decode, "verify", spy)
    monkeypatch.setattr(model.config, "max_position_embeddings", len(prompt) + max_new)
    policy = DraftPolicy(pass_costs=[1.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.1])  # pads every draft to 8 inputs
    oracle = Oracle(prompt, ref, model.config.vocab_size)

    class OneToken:  # one-token drafts: every step is padded, up to the very last one
        name, prior = "one", 0.99

        def propose(self, context, k):
            return oracle.propose(context, min(k, 1))

    got = speculative_generate(model, prompt, max_new, eos, [OneToken()], policy)
    assert got.output_ids == ref and len(seen) >= 5
    assert max(seen) == len(prompt) + max_new  # padded right up to the last position, never past it
