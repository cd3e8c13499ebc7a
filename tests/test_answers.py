"""Answers from a trained home: --draft-only, --cache (no store), and `kvdb bench`, on a tiny random Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kvdb.config import load_config
from kvdb.lm import load_model
from kvdb.config import Home
from tests.conftest import Kvdb, write_jsonl
from tests.test_build_query import built_home, tiny_config  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory, built_home, tiny_config) -> Path:  # noqa: F811
    home = tmp_path_factory.mktemp("trained") / "home"
    shutil.copytree(built_home, home)
    kv = Kvdb(home, tiny_config)
    kv("train", "--epochs", "1", "--json")
    kv("export", "--json")
    return home


@pytest.fixture
def kvt(trained_home, tiny_config, tmp_path) -> Kvdb:  # noqa: F811
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    return Kvdb(home, tiny_config)


@pytest.fixture(scope="module")
def lm(tiny_config):  # noqa: F811
    return load_model(load_config(tiny_config).model, Home.resolve(None))


def _greedy(lm, prompt_ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


def test_draft_only_is_marked_unverified(kvt: Kvdb):
    out = kvt.json("query", "--generate", "--draft-only", "-n", "12", "What is entropy?")
    assert out["verified"] is False and out["draft"].endswith(".pth")
    assert 1 <= len(out["output_ids"]) <= 12 and out["stats"]["verify_steps"] == 0
    verified = kvt.json("query", "--generate", "-n", "12", "What is entropy?")
    assert verified["verified"] is True and verified["prompt_ids"] == out["prompt_ids"]
    text = kvt("query", "--generate", "--draft-only", "-n", "6", "What is entropy?").stderr
    assert "NOT verified" in text
    compared = kvt.json("query", "--generate", "--draft-only", "--vs-greedy", "-n", "12", "What is entropy?")
    assert compared["greedy_baseline"]["answer"] == verified["answer"]
    assert -1.0 <= compared["greedy_baseline"]["similarity"]["cosine"] <= 1.0
    assert "similarity to it" in kvt("query", "--generate", "--draft-only", "--vs-greedy", "-n", "6",
                                     "What is entropy?").stderr
    assert "contradict" in kvt("query", "--generate", "--draft-only", "--no-draft", "x?", ok=False).stderr
    bare = Kvdb(kvt.home, kvt.config)
    shutil.rmtree(kvt.home / "checkpoints")
    assert "needs a trained draft" in bare("query", "--generate", "--draft-only", "x?", ok=False).stderr


def test_cache_alone_answers_like_the_store(kvt: Kvdb, tmp_path, lm):
    cache = kvt.home / "knowledge_cache" / "knowledge_cache.pth"
    draft = next((kvt.home / "checkpoints").glob("best_draft_model_epoch*.pth"))
    deploy = tmp_path / "deploy"  # a fresh home holding nothing: no database, no index, no checkpoints
    kd = Kvdb(deploy, kvt.config)
    q = "How do plants make sugar?"
    assert kd.json("query", "--cache", str(cache), q)["matches"][0]["question"] == \
        kvt.json("query", q)["matches"][0]["question"]
    out = kd.json("query", "--cache", str(cache), "--generate", "--draft", str(draft), "-n", "16", q)
    from_store = kvt.json("query", "--generate", "-n", "16", q)
    assert out["prompt_ids"] == from_store["prompt_ids"]
    assert out["output_ids"] == from_store["output_ids"] == _greedy(lm, out["prompt_ids"], 16)
    assert not (deploy / "kvdb.sqlite").exists()  # nothing written next to a deployment
    assert "does not exist" in kd("query", "--cache", str(tmp_path / "nope.pth"), q, ok=False).stderr
    bogus = tmp_path / "bogus.pth"
    torch.save({"hello": torch.zeros(1)}, bogus)
    assert "not a kvdb knowledge cache" in kd("query", "--cache", str(bogus), "--generate", q, ok=False).stderr


def test_cache_carries_the_recorded_answers(kvt: Kvdb, tmp_path, lm):
    """The export after training holds each pair's recorded answer (with the states the draft reads): a deployment
    replays it for a stored question asked verbatim, exactly as the store does, and `kvdb import` brings the
    recordings back, so the imported home exports the same bytes."""
    from kvdb.export import load_cache, recorded_entry

    cache = kvt.home / "knowledge_cache" / "knowledge_cache.pth"
    obj = load_cache(cache)
    entries = [recorded_entry(obj, i) for i in range(len(obj["qa_pairs"]))]
    assert all(e is not None for e in entries)
    layers = [f"layer_{n}" for n in obj["model"]["layers"]]
    assert all(e[k].shape[0] == e["output_ids"].shape[0] for e in entries for k in layers)

    q = obj["qa_pairs"][0]["question"]
    kd = Kvdb(tmp_path / "deploy", kvt.config)
    out = kd.json("query", "--cache", str(cache), "--generate", "--no-draft", "-n", "12", q)
    from_store = kvt.json("query", "--generate", "--no-draft", "-n", "12", q)
    assert out["output_ids"] == from_store["output_ids"] == _greedy(lm, out["prompt_ids"], 12)
    for stats in (out["stats"], from_store["stats"]):
        # The first token from prefill, the rest drafted from the recording in one pass (two where this machine's
        # measured pass costs make a shorter pass cheaper), every drafted token accepted.
        exact = stats["sources"]["exact"]
        assert stats["verify_steps"] <= 2 and exact["drafted"] == exact["accepted"] >= 9, stats

    other = Kvdb(tmp_path / "imported", kvt.config)
    assert other.json("import", str(cache))["base_answers"] == len(entries)
    other("export", "--out", str(tmp_path / "again"))
    assert (tmp_path / "again" / "knowledge_cache.pth").read_bytes() == cache.read_bytes()


def test_an_answer_to_a_confident_rephrasing_becomes_a_copy_source(kvt: Kvdb, lm):
    """A generated answer is recorded; when retrieval was sure of its top pair, the next question about that pair
    copies from it too (an off-topic answer is tagged with no pair)."""
    from kvdb.answer import StoreKnowledge
    from kvdb.runtime import Runtime

    sure = kvt.json("query", "--generate", "-n", "12", "Why does the sky look blue to us?")
    unsure = kvt.json("query", "--generate", "-n", "12", "How long should I boil an egg?")
    assert sure["confident"] and not unsure["confident"]  # what the cases below rely on
    from kvdb.recorded import prompt_key, read_recordings

    rt = Runtime.open(kvt.home, kvt.config)
    top = sure["matches"][0]["hash"]
    assert sure["output_ids"] in StoreKnowledge(rt, lm).recorded_answers([top])
    keys = [prompt_key(sure["prompt_ids"]), prompt_key(unsure["prompt_ids"])]
    entries = read_recordings(rt.store, lm.fingerprint, keys)  # (the tiny model's answers repeat: check the tags)
    assert entries[keys[0]].pair == top
    assert entries[keys[1]].output == unsure["output_ids"] and entries[keys[1]].pair is None


def test_exports_carry_answers_to_rephrasings(kvt: Kvdb, tmp_path, lm):
    """An answer to a confident rephrasing travels with the pair: the export holds it under the pair, a deployment
    from the cache alone copies from it, and `kvdb import` adds it to the new home's recorded answers (once)."""
    from kvdb.answer import StoreKnowledge
    from kvdb.deployed import CacheKnowledge
    from kvdb.export import load_cache, variant_entries
    from kvdb.runtime import Runtime

    sure = kvt.json("query", "--generate", "-n", "12", "Why does the sky look blue to us?")
    assert sure["confident"]
    top = sure["matches"][0]["hash"]
    out = tmp_path / "exported"
    kvt("export", "--out", str(out))
    cache = out / "knowledge_cache.pth"
    obj = load_cache(cache)
    i = [qa["hash"] for qa in obj["qa_pairs"]].index(top)
    assert sure["output_ids"] in [e["output_ids"].tolist() for e in variant_entries(obj, i)]

    deployed = CacheKnowledge(load_config(kvt.config), Home.resolve(tmp_path / "deploy"), cache, lm)
    assert sure["output_ids"] in deployed.recorded_answers([top])

    other = Kvdb(tmp_path / "imported", kvt.config)
    report = other.json("import", str(cache))
    assert report["variant_answers"] >= 1
    rt = Runtime.open(other.home, other.config)
    assert sure["output_ids"] in StoreKnowledge(rt, lm).recorded_answers([top])
    assert other.json("import", str(cache))["variant_answers"] == 0  # already there: nothing added twice


def test_bench_runs_every_method_on_the_same_prompts(kvt: Kvdb, tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"query": "What is entropy?", "workload": "stored"},
        {"query": "Why does the sky look blue?", "workload": "paraphrased"},
        {"query": "How long should I boil an egg?", "workload": "unanswerable"},
    ])
    chart = tmp_path / "bench.png"
    report = kvt.json("bench", "--questions", str(questions), "-n", "10", "--plot", str(chart))
    assert report["methods"] == ["greedy", "hf_prompt_lookup", "hf_early_exit", "kvdb_copy", "kvdb_draft"]
    assert any("llama.cpp methods skipped" in n and "GGUF" in n for n in report["notices"])  # not a GGUF model
    assert {(s["workload"], s["method"]) for s in report["summary"]} == \
        {(w, m) for w in ("stored", "paraphrased", "unanswerable") for m in report["methods"]}
    for s in report["summary"]:
        assert s["identical"] == s["questions"] == 1, s  # every method gives greedy's tokens
        assert s["speedup_median"] > 0 and s["tokens_per_second"] > 0
        assert (s["accepted_per_step"] is None) == (not s["method"].startswith("kvdb"))
    greedy = [r for r in report["rows"] if r["method"] == "greedy"]
    assert all(r["speedup"] == 1.0 for r in greedy)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = kvt("bench", "--questions", str(questions), "-n", "4", "--methods", "greedy,kvdb_copy").stdout
    assert "| stored | kvdb_copy |" in text
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "x?", "workload": "other"}])
    assert "'workload' must be one of" in kvt("bench", "--questions", str(bad), ok=False).stderr
    assert "unknown method" in kvt("bench", "--questions", str(questions), "--methods", "magic", ok=False).stderr
    blocked = tmp_path / "file"
    blocked.write_text("x")
    out = kvt("bench", "--questions", str(questions), "-n", "2", "--methods", "greedy", "--plot",
              str(blocked / "chart.png"), ok=False)
    assert "cannot write the chart" in out.stderr and "Traceback" not in out.stderr
    json.dumps(report)  # the report is plain JSON


def test_training_recorded_what_a_verbatim_question_is_answered_from(kvt: Kvdb, lm):
    out = kvt.json("query", "--generate", "-n", "24", "What is entropy?")  # asked for the first time
    exact = out["stats"]["sources"].get("exact")
    assert exact and exact["accepted"] >= out["stats"]["new_tokens"] // 2, out["stats"]  # the recording was used
    assert out["stats"]["verify_steps"] <= 4
    assert out["output_ids"] == _greedy(lm, out["prompt_ids"], 24)


def test_vs_greedy_reports_speedup_and_identity(kvt: Kvdb):
    out = kvt.json("query", "--generate", "--vs-greedy", "-n", "12", "Why is the sky blue?")
    base = out["greedy_baseline"]
    assert base["identical"] is True and base["seconds"] > 0
    assert base["speedup"] == pytest.approx(base["seconds"] / out["stats"]["seconds"], rel=0.01)
    text = kvt("query", "--generate", "--vs-greedy", "-n", "6", "Why is the sky blue?").stderr
    assert "speedup" in text and "identical output: yes" in text
    assert "go with --generate" in kvt("query", "--vs-greedy", "x?", ok=False).stderr


def test_train_text_summary(kvt: Kvdb):
    out = kvt("train", "--epochs", "1", "--resume").stdout
    assert "trained 1 epoch(s) to epoch 2" in out and "top-1 agreement with the base model" in out
    assert "evaluated" in kvt("train", "--eval-only").stdout


def test_bench_default_questions_come_from_the_store_and_the_bundled_sets(kvt: Kvdb):
    report = kvt.json("bench", "--per-workload", "1", "-n", "4", "--methods", "greedy,kvdb_copy")
    by_workload = {r["workload"]: r["query"] for r in report["rows"]}
    assert set(by_workload) == {"stored", "paraphrased", "unanswerable"}
    stored = {p["question"] for p in kvt.json("list")}
    assert by_workload["stored"] in stored
    # Only paraphrases of questions this store holds (the tiny store shares a few with the default set).
    from kvdb.bench import _bundled

    sources = {r["query"]: r["source_question"] for r in _bundled("paraphrases.jsonl")}
    assert sources[by_workload["paraphrased"]] in stored
    assert by_workload["unanswerable"] in {r["query"] for r in _bundled("unanswerable.jsonl")}
