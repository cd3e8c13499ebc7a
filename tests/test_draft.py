"""The draft model (kvdb.draft) on tiny random models: it starts as the exact early exit, drafts greedily with a
KV cache that rolls back, plugs into the decoding engine losslessly, round-trips through checkpoints, refuses
foreign ones, and with knowledge learns a copy task that the same draft without knowledge cannot."""

from __future__ import annotations

import random

import pytest
import torch

from kvdb.config import DraftConfig, Home, ModelConfig
from kvdb.draft import (
    DraftModel,
    Knowledge,
    KnowledgeBatch,
    LearnedDraftSource,
    PairKnowledge,
    load_draft,
    read_checkpoint,
    save_checkpoint,
)
from kvdb.errors import CorruptError, ForeignFileError, NotFoundError
from kvdb.lm import load_model
from tests.tiny import make_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and on a busy 2-core machine a second thread slows every pass a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    out = {}
    for seed, arch in enumerate(("llama", "qwen3")):
        folder = make_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, layers=4, hidden=64, seed=seed)
        out[arch] = load_model(ModelConfig(source=str(folder)), Home(tmp_path_factory.mktemp(f"home-{arch}")))
    return out


@pytest.fixture
def lm(lms):
    return lms["llama"]


def pair_knowledge(lm, pair_hash: str, question: str, answer_ids: list[int], layers: tuple[int, int]):
    """What `kvdb build` would store for one pair: layer outputs over chat(question) + answer + eos."""
    prompt = lm.chat_ids([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = prompt + answer_ids + [lm.eos_ids[0]]
    with torch.no_grad():
        out = lm.model(torch.tensor([ids]), output_hidden_states=True)
    tensors = {"token_ids": torch.tensor(ids, dtype=torch.int32)}
    for layer in layers:
        tensors[f"layer_{layer}"] = out.hidden_states[layer][0].to(torch.float16)
    return PairKnowledge.from_vectors(pair_hash, tensors, len(prompt), *layers)


def scramble_knowledge(draft: DraftModel, seed: int = 0) -> None:
    """Give the knowledge module non-trivial weights so that tests see it act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.knowledge.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_untrained_draft_is_the_early_exit(lms, arch):
    lm = lms[arch]
    draft = DraftModel(lm, DraftConfig(num_sampled_layers=2, trainable_layers=1, vocab_frequent=0))
    ids = torch.randint(3, draft.vocab_size, (2, 17))
    with torch.no_grad():
        logits = draft(ids, torch.arange(draft.vocab_size))
        hidden = lm.model(ids, output_hidden_states=True).hidden_states[2]
        expected = lm.model.get_output_embeddings()(lm.decoder.norm(hidden))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_only_trained_parts_are_in_the_state(lm):
    draft = DraftModel(lm, DraftConfig(num_sampled_layers=2, trainable_layers=1))
    keys = list(draft.state_dict())
    assert not any("embed" in k or "lm_head" in k for k in keys)
    assert {k.split(".")[0] for k in keys} == {"layers", "knowledge", "static_vocab"}
    assert len(draft.layers) == 1
    # The shared head is the base model's own tensor, not a copy.
    assert draft.head_weight.data_ptr() == lm.model.get_output_embeddings().weight.data_ptr()


def _teacher_greedy(draft, context, knowledge, vocab, k):
    """Greedy drafting without any cache: a full forward per token."""
    mem = KnowledgeBatch.stack([knowledge], draft.head_weight, draft.device, draft.dtype) if knowledge.size else None
    out, ctx = [], list(context)
    for _ in range(k):
        with torch.no_grad():
            logits = draft(torch.tensor([ctx]), vocab, mem)
        token = int(vocab[int(logits[0, -1].argmax())])
        out.append(token)
        ctx.append(token)
    return out


def test_source_drafts_greedily_and_rolls_back(lm):
    cfg = DraftConfig(num_sampled_layers=2, trainable_layers=1, vocab_frequent=64)
    draft = DraftModel(lm, cfg)
    scramble_knowledge(draft)
    k1 = pair_knowledge(lm, "a" * 64, "What is entropy?", lm.encode("A measure of disorder in a system."), (2, 4))
    knowledge = Knowledge.from_pairs([k1], 512, lm.hidden_size)
    source = LearnedDraftSource(draft, lm, knowledge)
    prompt = lm.chat_ids([{"role": "user", "content": "Explain entropy."}], add_generation_prompt=True)
    vocab = draft.vocab_for(prompt, knowledge.next_ids)

    first = source.propose(prompt, 4)
    assert first == _teacher_greedy(draft, prompt, knowledge, vocab, 4)
    # The verifier accepted one token and chose another: the draft's cache must forget the rejected ones.
    other = next(t for t in range(5, 60) if t != first[1])
    context = prompt + [first[0], other]
    second = source.propose(context, 3)
    assert second == _teacher_greedy(draft, context, knowledge, vocab, 3)
    # Asking again for the same context gives the same tokens (the cache is re-aligned, not extended).
    assert source.propose(context, 3) == second
    # A new question: a fresh source and a reused one agree.
    new_prompt = lm.chat_ids([{"role": "user", "content": "What is a prime number?"}], add_generation_prompt=True)
    assert source.propose(new_prompt, 3) == LearnedDraftSource(draft, lm, knowledge).propose(new_prompt, 3)


def test_learned_source_is_lossless_in_the_engine(lm):
    from kvdb.decode import speculative_generate

    draft = DraftModel(lm, DraftConfig(num_sampled_layers=2, vocab_frequent=64))
    scramble_knowledge(draft, seed=1)
    k1 = pair_knowledge(lm, "b" * 64, "What is a prime number?", lm.encode("A whole number above one."), (2, 4))
    knowledge = Knowledge.from_pairs([k1], 512, lm.hidden_size)
    prompt = lm.chat_ids([{"role": "user", "content": "What is a prime number?"}], add_generation_prompt=True)
    with torch.inference_mode():
        expected = lm.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                                     eos_token_id=lm.eos_ids, pad_token_id=lm.eos_ids[0])[0, len(prompt):].tolist()
    source = LearnedDraftSource(draft, lm, knowledge)
    # An untrained draft on a 4-layer model is (rightly) never worth asking; here it must be asked.
    source.prior, source.token_cost = 0.95, 0.0
    result = speculative_generate(lm.model, prompt, 24, lm.eos_ids, sources=[source])
    assert result.output_ids == expected
    assert source.drafted > 0


def test_checkpoint_round_trip_and_refusals(lm, lms, tmp_path):
    cfg = DraftConfig(num_sampled_layers=2, vocab_frequent=128)
    draft = DraftModel(lm, cfg)
    scramble_knowledge(draft, seed=2)
    path = save_checkpoint(tmp_path / "best_draft_model_epoch3.pth", draft, epoch=3, metrics={"top1": 0.5},
                           optimizer_state={"state": {}, "param_groups": []}, history=[{"epoch": 3}])
    raw = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert raw["epoch"] == 3 and raw["fingerprint"] == lm.fingerprint and raw["num_sampled_layers"] == 2
    assert raw["draft_config"]["vocab_frequent"] == 128
    loaded = load_draft(path, lm)
    ids = torch.randint(3, draft.vocab_size, (1, 9))
    vocab = draft.vocab_for(ids[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, vocab), draft(ids, vocab))
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file and renamed

    with pytest.raises(ForeignFileError, match="num_sampled_layers"):
        load_draft(path, lm, DraftConfig(num_sampled_layers=3))
    eagle = tmp_path / "eagle.pth"  # a draft trained to read the base model's features, which kvdb dropped
    torch.save({**raw, "draft_config": {**raw["draft_config"], "use_base_features": True}}, eagle)
    with pytest.raises(ForeignFileError, match="train a new draft"):
        load_draft(eagle, lm)
    with pytest.raises(ForeignFileError, match="trained for"):
        load_draft(path, lms["qwen3"])
    foreign = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ForeignFileError, match="not a kvdb draft checkpoint"):
        load_draft(foreign, lm)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptError):
        read_checkpoint(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ForeignFileError):
        read_checkpoint(garbage)
    with pytest.raises(NotFoundError):
        read_checkpoint(tmp_path / "missing.pth")


def test_knowledge_beats_no_knowledge_on_a_copy_task(lm):
    """Answers are random token strings that appear only in the stored knowledge (never in the prompt), and the
    held-out pairs were never trained on: only a draft that reads the knowledge can predict them."""
    from kvdb.evaluate import evaluate
    from kvdb.train import frozen_states, make_optimizer, train_epoch
    from kvdb.train_data import Example

    rng = random.Random(0)
    cfg = DraftConfig(num_sampled_layers=2, trainable_layers=1, vocab_frequent=0)
    pairs, examples = {}, []
    for i in range(24):
        question = f"Question number {i}?"
        answer = [rng.randrange(20, 400) for _ in range(10)]
        h = f"{i:064d}"
        pairs[h] = pair_knowledge(lm, h, question, answer, (2, 4))
        prompt = lm.chat_ids([{"role": "user", "content": question}], add_generation_prompt=True)
        other = f"{(i + 7) % 24:064d}"
        examples.append(Example(h, question, "question", [other, h] if i % 2 else [h, other], prompt,
                                answer + [lm.eos_ids[0]]))
    train, held = examples[:16], examples[16:]

    def trained(use_knowledge: bool) -> float:
        torch.manual_seed(0)
        draft = DraftModel(lm, cfg)
        draft.knowledge.set_statistics(torch.cat([p.keys for p in pairs.values()]))
        for e in examples:
            e.states = None
        frozen_states(draft, examples)
        opt = make_optimizer(draft, 1e-3, 1e-3)
        vocab = torch.arange(draft.vocab_size)
        for epoch in range(6):
            train_epoch(draft, opt, train, pairs, vocab, 4, seed=epoch, use_knowledge=use_knowledge)
        return evaluate(draft, held, pairs, use_knowledge=use_knowledge, full_vocab=True)["top1_agreement"]

    with_knowledge, without = trained(True), trained(False)
    assert with_knowledge > 0.6, with_knowledge
    assert with_knowledge > without + 0.4, (with_knowledge, without)


def test_a_pickle_with_code_is_refused_unread(lm, tmp_path):
    import argparse

    evil = tmp_path / "pickled.pth"
    torch.save({"format": "kvdb.draft_checkpoint", "x": argparse.Namespace(a=1)}, evil)
    with pytest.raises(ForeignFileError, match="not a kvdb draft checkpoint"):
        load_draft(evil, lm)
