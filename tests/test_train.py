"""Draft training (kvdb.train) on a tiny random Llama and a small built store: the loss falls, base answers are
recorded once and are exactly greedy, checkpoints round-trip and resume continues the epoch count, an exported cache
trains too, and bad input is refused with a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kvdb.build import Builder
from kvdb.errors import CorruptError, ForeignFileError, NotBuiltError, NotFoundError, StoreError
from kvdb.examples import example_pairs
from kvdb.runtime import Runtime
from kvdb.store.pairs import add_pairs, validate
from kvdb.evaluate import simulate_steps, summarise
from kvdb.train import train
from tests.tiny import make_model, write_tiny_config

SECTIONS = {"build": {"batch_size": 8}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "llama", layers=4, hidden=64)


def write_config(folder: Path, model: Path, **sections: dict) -> Path:
    merged = {k: {**SECTIONS.get(k, {}), **sections.get(k, {})} for k in SECTIONS.keys() | sections.keys()}
    return write_tiny_config(folder / "kvdb.yaml", model, **merged)


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_dir) -> tuple[Path, Path]:
    """A home with 8 default pairs (two per domain for four domains, each with two variants), built."""
    root = tmp_path_factory.mktemp("built")
    cfg = write_config(root, model_dir)
    rt = Runtime.open(root / "home", cfg)
    chosen, seen = [], {}
    for p in example_pairs():
        if seen.get(p.domain, 0) < 2 and len(seen) <= 4:
            seen[p.domain] = seen.get(p.domain, 0) + 1
            chosen.append(validate(p, rt.config.store))
    add_pairs(rt.store, chosen[:8], rt.config.store)
    Builder(rt.config, rt.home, rt.store).run(progress=False)
    rt.store.dispose()
    return root / "home", cfg


@pytest.fixture(scope="module")
def trained(built, tmp_path_factory):
    """One training run (2 epochs) shared by the tests that read its outputs."""
    src, cfg = built
    home = tmp_path_factory.mktemp("trained") / "home"
    shutil.copytree(src, home)
    rt = Runtime.open(home, cfg)
    result = train(rt, progress=False)
    return rt, result


def test_training_lowers_the_loss_and_writes_its_outputs(trained):
    rt, result = trained
    out = rt.home.checkpoints_dir
    log = json.loads((out / "train_log.json").read_text())
    losses = [e["train_loss"] for e in log["epochs"]]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert result["eval_set"] == "heldout" and result["data"]["heldout_pairs"] == 2
    assert result["data"]["train_examples"] == 6 * 3  # question + two variants of each of the 6 training pairs
    # The draft beats the untrained early exit on pairs it never saw.
    assert result["metrics"]["top1_agreement"] > result["untrained_early_exit"]["top1_agreement"]
    assert set(result["metrics"]["draft_lengths"]) == {"1", "2", "4", "8"}
    names = {p.name for p in out.glob("*.pth")}
    assert {"draft_model_epoch1.pth", "draft_model_epoch2.pth"} <= names
    # One best checkpoint: the epoch with the best held-out agreement (a better epoch replaces the previous one).
    best_epoch = max(log["epochs"], key=lambda e: e["heldout"]["top1_agreement"])["epoch"]
    assert {n for n in names if n.startswith("best_")} == {f"best_draft_model_epoch{best_epoch}.pth"}
    assert result["best"]["path"].endswith(f"best_draft_model_epoch{best_epoch}.pth")
    assert (out / "train_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "draft_model_epoch2.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["fingerprint"] and ckpt["draft_config"]["num_sampled_layers"] == 2
    assert ckpt["optimizer"]["state"] and "heldout" in ckpt["metrics"]
    assert not list(out.glob(".*.tmp"))


def record_base_answers(rt, lm) -> dict[str, int]:
    """The base model's answers to the store's pairs' own questions under generation's own retrieval (re-ranked as
    configured), computed where missing."""
    from kvdb.prompt import prompt_ids
    from kvdb.recorded import AnswerBook, AnswerRequest
    from kvdb.teacher import compute_answers
    from kvdb.train_data import default_references, load_store_sources

    sources = load_store_sources(rt, lm.fingerprint, rt.config.draft.num_sampled_layers, lm.num_layers)
    refs = default_references(rt, lm, sources, rt.config.index.top_k)
    requests = [AnswerRequest(prompt_ids(lm, p.question, list(refs(p.question))), pair_hash=p.hash)
                for p in sources.pairs]
    return compute_answers(AnswerBook(rt, lm, rt.config.generation.max_new_tokens), requests, 4)


def test_base_answers_are_stored_greedy_and_reused(trained):
    rt, _ = trained
    from kvdb.lm import load_model
    from kvdb.store.blobs import unpack
    from kvdb.store.models import BaseAnswer

    with rt.store.read() as session:
        rows = session.query(BaseAnswer).all()
        assert len(rows) == 8  # every pair's own question, keyed by pair, model and prompt format
        first = rows[0]
        saved = unpack(first.data, first.checksum, "answer")
        fmt, fp = first.prompt_format, first.fingerprint
    lm = load_model(rt.config.model, rt.home)
    assert fp == lm.fingerprint and fmt == "ref-v1"
    prompt = saved["prompt_ids"].tolist()
    with torch.inference_mode():
        expected = lm.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                                     eos_token_id=lm.eos_ids, pad_token_id=lm.eos_ids[0])[0, len(prompt):].tolist()
    got = saved["output_ids"].tolist()
    assert got == expected[: len(got)] and (len(got) == 12 or got[-1] in lm.eos_ids)
    # record_base_answers uses generation's own retrieval (re-ranked as configured, which training skips by
    # default): it replaces rows whose prompt differs, and a second call computes nothing.
    first_call = record_base_answers(rt, lm)
    assert first_call["recorded"] + first_call["reused"] == 8
    again = record_base_answers(rt, lm)
    assert again["recorded"] == 0 and again["reused"] == 8


def test_resume_continues_the_epoch_count(trained, tmp_path):
    rt, _ = trained
    out = tmp_path / "ckpt"
    shutil.copytree(rt.home.checkpoints_dir, out)
    result = train(rt, epochs=1, resume=True, out=out, progress=False)
    assert result["epoch"] == 3 and result["epochs_run"] == 1
    assert (out / "draft_model_epoch3.pth").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3]
    evaluated = train(rt, eval_only=True, out=out, progress=False)
    assert evaluated["metrics"]["tokens"] > 0 and "untrained_early_exit" in evaluated
    assert "without_knowledge" in evaluated


def test_trains_from_an_exported_cache(trained, tmp_path):
    rt, _ = trained
    from kvdb.export import export_caches

    export_caches(rt.config, rt.home, rt.store, out=tmp_path / "caches")
    cache = tmp_path / "caches" / "knowledge_cache.pth"
    plain = write_config(tmp_path, Path(rt.config.model.source))
    result = train(Runtime.open(rt.home.root, plain), epochs=1, cache=cache, out=tmp_path / "from-cache",
                   progress=False)
    assert result["epoch"] == 1 and result["data"]["pairs"] == 8

    # The seed's workflow: a fresh home trains from the cache alone. Its pairs' recordings are the answers to their
    # own questions computed now; variants read them as drafting from the store or the cache would.
    from kvdb.lm import load_model
    from kvdb.train_data import prepare

    fresh = Runtime.open(tmp_path / "fresh", plain)
    lm = load_model(fresh.config.model, fresh.home)
    data = prepare(fresh, lm, fresh.config.draft, cache=cache)
    examples = data.train + data.heldout
    answer_of = {e.pair: e.answer for e in examples if e.kind == "question"}
    variants = [e for e in examples if e.kind == "variant"]
    assert variants and all(e.recorded is not None for e in variants)
    assert all(e.recorded.next_ids.tolist() == answer_of[e.refs[0]] for e in variants)


def test_bad_input_is_refused_clearly(trained, built, tmp_path, model_dir):
    rt, _ = trained
    with pytest.raises(NotFoundError, match="does not exist"):
        train(rt, cache=tmp_path / "missing.pth", out=tmp_path / "o1", progress=False)
    foreign = tmp_path / "foreign.pth"
    torch.save({"hello": torch.zeros(1)}, foreign)
    with pytest.raises(ForeignFileError, match="not a kvdb"):
        train(rt, cache=foreign, out=tmp_path / "o2", progress=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot write checkpoints"):
        train(rt, out=blocker / "sub", progress=False)
    with pytest.raises(NotFoundError, match="no draft checkpoint"):
        train(rt, resume=True, out=tmp_path / "empty", progress=False)

    # Checkpoints: corrupt, for another draft shape, for another base model.
    out = tmp_path / "ckpt"
    out.mkdir()
    src = rt.home.checkpoints_dir / "draft_model_epoch2.pth"
    (out / "draft_model_last.pth").write_bytes(src.read_bytes()[:500])
    with pytest.raises(CorruptError):
        train(rt, resume=True, out=out, progress=False)
    payload = torch.load(src, weights_only=True)
    payload["fingerprint"] = "0" * 64
    torch.save(payload, out / "draft_model_last.pth")
    with pytest.raises(ForeignFileError, match="not the current model"):
        train(rt, resume=True, out=out, progress=False)
    shutil.copy(src, out / "draft_model_last.pth")
    other_cfg = write_config(tmp_path, model_dir, draft={"num_sampled_layers": 1})
    with pytest.raises(ForeignFileError, match="num_sampled_layers"):
        train(Runtime.open(rt.home.root, other_cfg), resume=True, out=out, progress=False)

    # An empty store, and a store built for another model.
    with pytest.raises(NotBuiltError, match="no pairs"):
        train(Runtime.open(tmp_path / "empty-home", built[1]), out=tmp_path / "o3", progress=False)
    other_model = make_model(tmp_path / "other", layers=4, hidden=64, seed=1)
    with pytest.raises(NotBuiltError, match="kvdb build"):
        train(Runtime.open(rt.home.root, write_config(tmp_path / "other", other_model)), out=tmp_path / "o4",
              progress=False)


def test_settings_of_removed_experiments_are_refused_by_name(tmp_path):
    """Sampled answers, soft targets, base features and extra contexts are gone: an old config naming one of their
    keys gets an error naming that key."""
    from kvdb.config import load_config
    from kvdb.errors import ConfigError

    for section, key in (("training", "soft_target_weight"), ("training", "samples_per_question"),
                         ("training", "unroll_steps"), ("training", "contexts_per_question"),
                         ("draft", "use_base_features"), ("draft", "stop_threshold")):
        path = tmp_path / f"{key}.yaml"
        path.write_text(f"{section}:\n  {key}: 1\n")
        with pytest.raises(ConfigError, match=f"unknown key '{section}.{key}'"):
            load_config(path)


def test_simulated_acceptance_follows_leviathan():
    # Every token agrees: each step accepts gamma and adds one.
    assert simulate_steps([True] * 10, 4) == (2, 8)
    # Nothing agrees: one token per step.
    assert simulate_steps([False] * 5, 8) == (5, 0)
    # Mixed: [T T F | T F] with gamma 8 -> step 1 accepts 2 (+1), step 2 accepts 1 (+1).
    assert simulate_steps([True, True, False, True, False], 8) == (2, 3)
    s = summarise([[True, True, False, True, False]])
    assert s["top1_agreement"] == 0.6 and s["draft_lengths"]["8"]["tokens_per_step"] == 2.5


def test_grouped_greedy_equals_generate(model_dir, tmp_path):
    """Prompts sharing a prefix are answered in one batch, exactly as `generate` answers each alone — also when
    rows finish at different steps (here a frequent token is declared end-of-turn to make them)."""
    from kvdb.config import Home, ModelConfig
    from kvdb.lm import load_model
    from kvdb.prompt import Reference, prompt_ids
    from kvdb.teacher import decode_grouped

    lm = load_model(ModelConfig(source=str(model_dir)), Home(tmp_path))
    refs = [Reference("What is a cat?", "A small furry animal."), Reference("What is a dog?", "An animal that barks.")]
    groups = [[prompt_ids(lm, q, refs) for q in ("What is a cat?", "Tell me about cats, please.", "Cats?")],
              [prompt_ids(lm, "Who barks?", refs[1:])], [prompt_ids(lm, "x", [])]]
    plain = decode_grouped(lm, groups, 16)
    first = plain[0][0]
    lm.eos_ids = [first[3]]  # rows now stop wherever this token comes first
    for eos in ([lm.model.generation_config.eos_token_id], lm.eos_ids):
        lm.eos_ids = list(eos) if isinstance(eos, list) else [eos]
        got = decode_grouped(lm, groups, 16)
        for group, answers in zip(groups, got):
            for prompt, answer in zip(group, answers):
                with torch.inference_mode():
                    ref = lm.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                                            eos_token_id=lm.eos_ids, pad_token_id=lm.eos_ids[0])
                ref = ref[0, len(prompt):].tolist()
                cut = next((i + 1 for i, t in enumerate(ref) if t in lm.eos_ids), len(ref))
                assert answer == ref[:cut]
    assert any(len(a) < 16 for g in got for a in g)


def test_cli_no_variants_trains_on_own_questions_only(built, tmp_path):
    from tests.conftest import Kvdb

    src, cfg = built
    home = tmp_path / "home"
    shutil.copytree(src, home)
    result = Kvdb(home, cfg).json("train", "--epochs", "1", "--no-variants")
    assert result["data"]["train_examples"] == 6 and result["epochs_run"] == 1
    assert "skipped" in result["warmed"] and result["warmed"]["engine"] == "transformers"  # nothing to replay


def test_recorded_answers_become_the_drafts_first_knowledge(trained):
    """Each stored answer gets the base model's states over it (the key layer's equal a plain forward's hidden
    states at the positions that predicted each answer token); training gives a variant the recording of its top
    reference, never a question its own answer; drafting reads it in front of the references; a checkpoint from
    before this knowledge existed loads as trained without it."""
    import dataclasses

    from kvdb.draft import DraftModel, draft_config_from, load_knowledge, load_recorded_knowledge
    from kvdb.lm import load_model
    from kvdb.store.blobs import unpack
    from kvdb.store.models import BaseAnswer
    from kvdb.teacher import fill_answer_states
    from kvdb.train_data import prepare

    rt, _ = trained
    lm = load_model(rt.config.model, rt.home)
    n, last = rt.config.draft.num_sampled_layers, lm.num_layers
    fill_answer_states(rt, lm, [n, last])  # rows another test replaced get theirs back
    assert fill_answer_states(rt, lm, [n, last]) == 0  # nothing left to fill
    with rt.store.read() as session:
        row = session.query(BaseAnswer).first()
        t = unpack(row.data, row.checksum, "answer")
        pair_hash = row.pair_hash
    prompt, out = t["prompt_ids"].tolist(), t["output_ids"].tolist()
    with torch.inference_mode():
        hs = lm.model(input_ids=torch.tensor([prompt + out[:-1]]), output_hidden_states=True).hidden_states
    expected = hs[n][0, len(prompt) - 1 :]
    assert t[f"layer_{n}"].shape == (len(out), lm.hidden_size) == t[f"layer_{last}"].shape
    assert torch.allclose(t[f"layer_{n}"].float(), expected.float(), atol=2e-2, rtol=1e-2)

    recorded = load_recorded_knowledge(rt.store, lm.fingerprint, [pair_hash], n, last)
    assert recorded[pair_hash].next_ids.tolist() == out

    data = prepare(rt, lm, rt.config.draft)
    question_of = {p.hash: p.question for p in data.sources.pairs}
    examples = data.train + data.heldout
    variants = [e for e in examples if e.kind == "variant" and e.refs]
    assert variants and all(e.recorded is not None and e.recorded.hash == f"answer:{e.refs[0]}" for e in variants)
    own = [e for e in examples if e.kind == "question" and e.refs and question_of[e.refs[0]] == e.question]
    assert own and all(e.recorded is None for e in own)
    assert data.info["with_recorded_answer"] == len([e for e in examples if e.recorded is not None])

    draft = DraftModel(lm, rt.config.draft)
    k = load_knowledge(rt.store, draft, [pair_hash])
    assert k.next_ids[: len(out)].tolist() == out and k.size > len(out)
    without = DraftModel(lm, dataclasses.replace(rt.config.draft, recorded_knowledge=False))
    assert load_knowledge(rt.store, without, [pair_hash]).size == k.size - len(out)
    old = {k: v for k, v in dataclasses.asdict(rt.config.draft).items() if k != "recorded_knowledge"}
    assert draft_config_from({"draft_config": old}).recorded_knowledge is False


def test_answers_to_rephrasings_become_copy_sources(trained):
    """Training's answers to a pair's variants are recorded in the store tagged with the pair, and a query whose
    references include that pair copies from them (besides the stored answer to the pair's own question)."""
    from kvdb.answer import StoreKnowledge
    from kvdb.lm import load_model
    from kvdb.recorded import AnswerBook, prompt_key, read_recordings
    from kvdb.train_data import prepare

    rt, _ = trained
    lm = load_model(rt.config.model, rt.home)
    data = prepare(rt, lm, rt.config.draft)
    pair = next(e.pair for e in data.train if e.kind == "variant")
    variant_answers = [e.answer for e in data.train if e.kind == "variant" and e.pair == pair]
    book = AnswerBook(rt, lm, rt.config.generation.max_new_tokens)
    about = book.answers_about([pair])  # also answers to those variants under other references (other runs)
    assert variant_answers and all(a in about for a in variant_answers)
    variants = [e for e in data.train if e.kind == "variant"]
    entries = read_recordings(rt.store, lm.fingerprint, [prompt_key(e.prompt) for e in variants])
    assert all(entries[prompt_key(e.prompt)].pair == e.pair for e in variants)  # tagged by prompt
    own = next(e.answer for e in data.train + data.heldout if e.kind == "question" and e.pair == pair)
    copies = StoreKnowledge(rt, lm).recorded_answers([pair])
    assert own in copies and all(a in copies for a in variant_answers)
    assert book.answers_about(["0" * 64]) == []
