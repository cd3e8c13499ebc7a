"""Answering on llama.cpp end to end, on a home whose model is a tiny GGUF: `auto` picks llama.cpp on the CPU, answers
equal llama.cpp's own greedy decoding, prefix states are kept and reused, and `kvdb bench` runs its llama.cpp
methods against that baseline."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (run `make install`)")

from kvdb.config import Home, load_config
from kvdb.decode import greedy_generate
from kvdb.engines import open_engine
from kvdb.lm import load_model
from tests.conftest import Kvdb, write_jsonl
from tests.test_build_query import PAIRS
from tests.tiny_gguf import TinyLlama, write_tiny_gguf


@pytest.fixture(scope="module")
def gguf_config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / "tiny.gguf", TinyLlama(n_layer=4, n_ctx_train=2048))
    cfg = folder / "kvdb.yaml"
    cfg.write_text(f"model:\n  source: {folder}\n  gguf_file: tiny.gguf\nbuild:\n  batch_size: 2\n  layers: [3, -1]\n"
                   "index:\n  rerank: false\n  confident_threshold_no_rerank: 0.5\ngeneration:\n  max_new_tokens: 16\n")
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory, gguf_config) -> Kvdb:
    home = tmp_path_factory.mktemp("built") / "home"
    kv = Kvdb(home, gguf_config)
    kv("add", "--file", str(write_jsonl(home.parent / "pairs.jsonl", PAIRS)))
    kv("build")
    return kv


@pytest.fixture(scope="module")
def lm(gguf_config):
    return load_model(load_config(gguf_config).model, Home.resolve(None))


def test_auto_answers_on_llama_cpp_exactly_as_its_greedy(built: Kvdb, lm):
    out = built.json("query", "--generate", "What is entropy?")
    assert out["stats"]["engine"] == "llama_cpp"
    with open_engine("llama_cpp", lm) as llama:  # the settings the answering engine was opened with
        want = greedy_generate(llama, out["prompt_ids"], 16, lm.eos_ids)
    assert out["output_ids"] == want.output_ids and want.stats["engine"] == "llama_cpp"


def test_prefix_states_are_kept_and_a_repeat_is_replayed(built: Kvdb, lm):
    first = built.json("query", "--generate", "Why does the sky look blue?")
    states = sorted((built.home / "models" / "states").glob("*.kvstate"))
    assert len(states) >= 2  # the instruction, the reference blocks, the whole prompt
    again = built.json("query", "--generate", "Why does the sky look blue?")
    assert again["output_ids"] == first["output_ids"]
    assert again["stats"]["replayed"] and again["stats"]["verify_steps"] == 0  # no model pass at all
    assert sorted((built.home / "models" / "states").glob("*.kvstate")) == states  # nothing new to keep
    with open_engine("llama_cpp", lm) as llama:
        assert again["output_ids"] == greedy_generate(llama, again["prompt_ids"], 16, lm.eos_ids).output_ids


def test_build_states_prepares_every_stored_question(tmp_path, gguf_config, lm):
    kv = Kvdb(tmp_path / "home", gguf_config)
    kv("add", "--file", str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)))
    report = kv.json("build", "--states")
    assert report["warmed"]["engine"] == "llama_cpp"
    assert report["warmed"]["answered"] == report["warmed"]["questions"] == len(PAIRS)
    again = kv.json("build", "--states")["warmed"]  # already recorded: replayed, nothing decoded
    assert again["replayed"] == len(PAIRS) and again["answered"] == 0
    out = kv.json("query", "--generate", PAIRS[0]["question"])
    assert out["stats"]["replayed"]  # the first ask of a stored question
    with open_engine("llama_cpp", lm) as llama:
        assert out["output_ids"] == greedy_generate(llama, out["prompt_ids"], 16, lm.eos_ids).output_ids


def test_transformers_stays_available_through_kvdb_engine(built: Kvdb, lm, monkeypatch):
    monkeypatch.setenv("KVDB_ENGINE", "transformers")
    out = built.json("query", "--generate", "What is entropy?")
    assert out["stats"]["engine"] == "transformers"
    assert out["output_ids"] == greedy_generate(lm.model, out["prompt_ids"], 16, lm.eos_ids).output_ids
    again = built.json("query", "--generate", "What is entropy?")
    assert not again["stats"]["replayed"]  # exact only up to ties between kernels: verified, never replayed


def test_bench_runs_the_llama_cpp_methods_against_llama_cpp_greedy(built: Kvdb, tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"query": "What is entropy?", "workload": "stored"},
        {"query": "Why is the sky blue during the day?", "workload": "paraphrased"},
    ])
    methods = "greedy,kvdb_copy,llamacpp_greedy,llamacpp_prompt_lookup,kvdb_llamacpp,kvdb_llamacpp_nostates"
    built("query", "--generate", "What is entropy?")  # recorded on llama.cpp: its stored row is replayed
    report = built.json("bench", "--questions", str(questions), "-n", "12", "--methods", methods)
    replayed = {(r["workload"], r["method"]) for r in report["rows"] if r["replayed"]}
    assert replayed == {("stored", "kvdb_llamacpp")}  # nostates decodes; the benchmark records nothing itself
    assert report["methods"] == ["greedy", "llamacpp_greedy", "kvdb_copy", "llamacpp_prompt_lookup",
                                 "kvdb_llamacpp", "kvdb_llamacpp_nostates"]
    for s in report["summary"]:
        assert s["identical"] == s["questions"] == 1, s  # each equals its own engine's greedy output
        assert s["baseline"] == ("llamacpp_greedy" if "llamacpp" in s["method"] else "greedy")
        assert s["speedup_llamacpp_median"] > 0
    llama = [r for r in report["rows"] if r["method"] == "llamacpp_greedy"]
    assert all(r["speedup_llamacpp"] == 1.0 and r["engine"] == "llama_cpp" for r in llama)
    assert "| stored | kvdb_llamacpp |" in built("bench", "--questions", str(questions), "-n", "4", "--methods",
                                                 "kvdb_llamacpp").stdout


@pytest.mark.parametrize("engine", ["transformers", "llama_cpp"])
def test_a_recording_the_answer_parts_from(built: Kvdb, lm, monkeypatch, engine):
    """Verified against a recording it parts from (another engine's), the answer is still exact. transformers then
    replaces the recording with its own answer, so its next ask is verified in long passes; llama.cpp, which replays
    its own answers, leaves the shared recording (what transformers verifies from and the draft trains on) alone."""
    from kvdb.recorded import AnswerBook, AnswerRequest
    from kvdb.runtime import Runtime

    monkeypatch.setenv("KVDB_ENGINE", engine)
    question = {"transformers": "What makes a rainbow?", "llama_cpp": "How do rainbows form?"}[engine]
    first = built.json("query", "--generate", question)
    rt = Runtime.open(built.home, built.config)
    wrong = first["output_ids"][:3] + [t + 1 for t in first["output_ids"][3:]]  # parts after 3 tokens
    AnswerBook(rt, lm, 16).record([AnswerRequest(prompt=first["prompt_ids"], output=wrong)])
    forget_replays(built.home)  # decode again, as on another build or thread count of llama.cpp
    again = built.json("query", "--generate", question)  # verified against the wrong recording: still exact
    assert again["output_ids"] == first["output_ids"] and again["stats"]["sources"]["exact"]["accepted"] == 2
    kept = AnswerRequest(prompt=first["prompt_ids"])
    AnswerBook(rt, lm, 16).lookup([kept])
    assert kept.output == (first["output_ids"] if engine == "transformers" else wrong)
    if engine == "transformers":
        third = built.json("query", "--generate", question)
        exact = third["stats"]["sources"]["exact"]
        assert third["output_ids"] == first["output_ids"]
        rest = len(first["output_ids"]) - 1  # the tokens after the one the prefill gives
        assert exact["drafted"] == exact["accepted"] >= rest - third["stats"]["verify_steps"]  # nothing rejected
    rt.store.dispose()


def forget_replays(home: Path) -> None:
    """Drop the engine answers kvdb.replay would return, so the next ask decodes."""
    with sqlite3.connect(home / "kvdb.sqlite") as conn:
        conn.execute("delete from engine_answers")


def test_train_answers_the_stored_questions_on_llama_cpp(tmp_path, gguf_config):
    kv = Kvdb(tmp_path / "home", gguf_config)
    kv("add", "--file", str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)))
    kv("build")
    warmed = kv.json("train", "--epochs", "1", "--no-variants")["warmed"]
    assert warmed["engine"] == "llama_cpp" and warmed["answered"] + warmed["replayed"] == len(PAIRS)
    assert warmed["failed"] == 0
    assert kv.json("query", "--generate", PAIRS[1]["question"])["stats"]["replayed"]
    assert "stored questions on llama_cpp: answered" in kv("train", "--epochs", "1", "--no-variants").stdout


def test_the_library_builds_with_states(tmp_path, gguf_config):
    import kvdb

    with kvdb.open(home=tmp_path / "home", config=gguf_config) as kb:
        kb.add_many([{k: p[k] for k in ("domain", "question", "answer")} for p in PAIRS[:3]])
        warmed = kb.build(states=True)["warmed"]
        assert warmed["answered"] == 3 and warmed["engine"] == "llama_cpp"
        assert kb.answer(PAIRS[2]["question"]).to_dict()["stats"]["replayed"]
