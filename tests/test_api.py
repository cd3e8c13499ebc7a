"""The Python API (kvdb.open -> KnowledgeBase) on a tiny random Llama: the documented example runs, results equal the
CLI's JSON, models load once, streaming joins to the answer and stops when asked, errors are KvdbErrors."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import torch

import kvdb
from kvdb.errors import AnswerCancelled, ConflictError, NotFoundError, ValidationError
from tests.conftest import Kvdb
from tests.test_build_query import PAIRS, built_home, kvb, tiny_config  # noqa: F401  (fixtures)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "serving.md"


def doc_example(section: str) -> str:
    """The first python code block under the ``## section`` heading of docs/serving.md."""
    text = DOCS.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def greedy(kb, prompt_ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = kb.lm().model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


def test_documented_example_runs(tmp_path, tiny_config, monkeypatch, capsys):  # noqa: F811
    readme = (DOCS.parent.parent / "README.md").read_text(encoding="utf-8")
    assert doc_example("Use it from Python") in readme  # the README shows the example this test runs
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVDB_CONFIG", str(tiny_config))
    ns: dict = {}
    exec(compile(doc_example("Use it from Python"), str(DOCS), "exec"), ns)
    out = capsys.readouterr().out
    a, r = ns["a"], ns["r"]
    assert r.matches and r.matches[0].question == "What is a B-tree?"
    assert set(r.to_dict()) == {"query", "confident", "matches"}
    with kvdb.open(home="var") as kb:
        assert a.output_ids == greedy(kb, a.prompt_ids, 64) and a.text == kb.lm().decode(a.output_ids)
        assert ns["h"] not in {p["hash"] for p in kb.list()}
        assert {p["question"] for p in kb.list("cs")} == {"What is a B-tree?", "What is a hash table?"}
        assert kb.get(kb.list()[1]["hash"][:10])["metadata"] == {"source": "notes"}
        # The removed pair back (the same hash) and built: the store the stream was answered from.
        assert kb.add("What is an index?", "A structure that finds rows without reading them all.", domain="cs",
                      metadata={"source": "notes"}) == ns["h"]
        assert kb.build()["built"] == 1
        streamed = kb.answer("What is a hash table?", max_new_tokens=64).text
        assert streamed and out.endswith(streamed)  # the stream printed the whole answer
    assert (tmp_path / "exported" / "knowledge_cache.pth").exists()
    assert (tmp_path / "exported" / "knowledge_cache_cs.pth").exists()


def test_query_and_answer_equal_the_cli_json(kvb: Kvdb):  # noqa: F811
    with kvdb.open(kvb.home, kvb.config) as kb:
        for q in ("What is entropy?", "How do plants make sugar?"):
            assert kb.query(q).to_dict() == kvb.json("query", q)
            assert kb.query(q, top_k=1, domain="physics").to_dict() == kvb.json("query", "-k", "1", "-d", "physics", q)
            mine = kb.answer(q, max_new_tokens=16)
            cli = kvb.json("query", "--generate", "-n", "16", q)
            got = mine.to_dict()
            for key in ("query", "confident", "matches", "answer", "prompt_ids", "output_ids", "draft", "verified"):
                assert got[key] == cli[key], key
            assert mine.text == cli["answer"] and mine.output_ids == greedy(kb, mine.prompt_ids, 16)
            assert mine.matches[0].question == cli["matches"][0]["question"]
            assert set(mine.stats) >= {"seconds", "new_tokens", "verify_steps", "drafted", "accepted"}
        assert [r.to_dict() for r in kb.query_many(["What is entropy?", "Why is the sky blue?"])] == \
            [kvb.json("query", "What is entropy?"), kvb.json("query", "Why is the sky blue?")]


def test_models_load_once_per_knowledge_base(kvb: Kvdb, monkeypatch):  # noqa: F811
    import kvdb.lm
    import kvdb.retrieve

    loads = {"model": 0, "embedder": 0}
    real_model, real_embedder = kvdb.lm.load_model, kvdb.retrieve.load_embedder

    def count(kind, real):
        def wrapper(*args, **kwargs):
            loads[kind] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(kvdb.lm, "load_model", count("model", real_model))
    monkeypatch.setattr(kvdb.retrieve, "load_embedder", count("embedder", real_embedder))
    with kvdb.open(kvb.home, kvb.config) as kb:
        kb.query("What is entropy?")
        kb.answer("What is entropy?", max_new_tokens=8)
        after_first = dict(loads)
        for q in ("Why is the sky blue?", "What is a prime number?"):
            kb.query(q)
            kb.answer(q, max_new_tokens=8)
            "".join(kb.answer_stream(q, max_new_tokens=8))
        assert loads == after_first and after_first["model"] == 1
        assert kb.answerer() is kb.answerer() and kb.lm() is kb.answerer().lm


def test_stream_joins_to_the_answer_and_stops_when_asked(kvb: Kvdb):  # noqa: F811
    with kvdb.open(kvb.home, kvb.config) as kb:
        q = "What do mitochondria do for a cell?"
        pieces = list(kb.answer_stream(q, max_new_tokens=24))
        assert len(pieces) >= 1 and "".join(pieces) == kb.answer(q, max_new_tokens=24).text

        stop, seen = threading.Event(), []

        def on_text(piece: str) -> None:
            seen.append(piece)
            stop.set()  # the caller is gone after the first piece

        with pytest.raises(AnswerCancelled):
            kb.answer("Tell me about the sky and the sea?", max_new_tokens=200, on_text=on_text, stop=stop)
        assert len(seen) == 1 and not kb.model_lock.locked()
        stream = kb.answer_stream("Tell me about the sky and the sea?", max_new_tokens=200)
        first = next(stream)
        stream.close()  # stops the decoding and frees the model
        assert first and not kb.model_lock.locked()
        full = kb.answer("Tell me about the sky and the sea?", max_new_tokens=200)
        assert full.text.startswith(first) and full.output_ids == greedy(kb, full.prompt_ids, 200)


def test_threads_share_one_knowledge_base(kvb: Kvdb):  # noqa: F811
    questions = [p["question"] for p in PAIRS] + ["How do plants make sugar?", "Why is the sea salty?"]
    with kvdb.open(kvb.home, kvb.config) as kb:
        alone = {q: kb.answer(q, max_new_tokens=12).output_ids for q in questions}
        results: dict[str, list[int]] = {}
        errors: list[BaseException] = []

        def ask(q: str) -> None:
            try:
                results[q] = kb.answer(q, max_new_tokens=12).output_ids
                kb.query(q)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and results == alone


def test_errors_are_kvdb_errors_and_writes_all_or_nothing(kvb: Kvdb):  # noqa: F811
    with kvdb.open(kvb.home, kvb.config) as kb:
        before = kb.list()
        with pytest.raises(ValidationError, match="record 2: missing field 'answer'"):
            kb.add_many([{"question": "What is a heap?", "answer": "A tree-shaped priority queue.", "domain": "cs"},
                         {"question": "What is a stack?", "domain": "cs"}])
        with pytest.raises(ValidationError, match="record 1: no domain"):
            kb.add_many([{"question": "What is a heap?", "answer": "A tree-shaped priority queue."}])
        with pytest.raises(ValidationError, match="record 1: must be a dict"):
            kb.add_many(["What is a heap?"])
        with pytest.raises(ValidationError):
            kb.add_many([])
        assert kb.list() == before
        report = kb.add_many([{"question": "What is a heap?", "answer": "A tree-shaped priority queue."}], domain="cs")
        assert (report.added, report.skipped) == (1, 0)
        h = kb.add("What is a heap?", "A tree-shaped priority queue.", domain="cs")
        assert h == report.hashes[0]
        with pytest.raises(ConflictError, match="replace"):
            kb.add("What is a heap?", "Memory for objects.", domain="cs")
        assert kb.add("What is a heap?", "Memory for objects.", domain="cs", replace=True) != h
        for call, kind in [(lambda: kb.remove("f" * 64), NotFoundError), (lambda: kb.get("zz"), ValidationError),
                           (lambda: kb.query("  "), ValidationError), (lambda: kb.list("nope"), NotFoundError),
                           (lambda: kb.answer("What is entropy?", max_new_tokens=0), ValidationError),
                           (lambda: kb.remove(), ValidationError)]:
            with pytest.raises(kind) as err:
                call()
            assert isinstance(err.value, kvdb.KvdbError) and str(err.value)
        assert len(kb.remove(domain="cs")) == 1 and kb.list() == before


def test_build_adds_missing_pairs_and_refuses_a_second_at_once(kvb: Kvdb):  # noqa: F811
    with kvdb.open(kvb.home, kvb.config) as kb:
        assert kb.build()["built"] == 0
        kb.add("What is a heap?", "A tree-shaped priority queue.", domain="cs")
        report = kb.build(domain="all")
        assert (report["built"], report["indexed_pairs"]) == (1, len(PAIRS) + 1)
        assert kb.query("What is a heap?").matches[0].question == "What is a heap?"
        kb._build_lock.acquire()  # as if another thread were building
        try:
            with pytest.raises(ConflictError, match="already running"):
                kb.build(wait=False)
        finally:
            kb._build_lock.release()


def test_open_uses_the_cli_defaults(kvb: Kvdb, monkeypatch):  # noqa: F811
    monkeypatch.setenv("KVDB_HOME", str(kvb.home))
    monkeypatch.setenv("KVDB_CONFIG", str(kvb.config))
    with kvdb.open() as kb:
        assert kb.home.root == kvb.home.resolve() and kb.config.source == str(kvb.config)
        assert kb.domains() == kvb.json("domains")
        assert kb.list() == kvb.json("list")
    assert isinstance(kb, kvdb.KnowledgeBase)


def test_cli_notices_come_through_the_library_log(kvb: Kvdb):  # noqa: F811
    """The CLI over the library: its notices (here: no trained draft) reach stderr as `notice:` lines, and -q
    silences them without changing the answer."""
    loud = kvb("query", "--generate", "--json", "-n", "4", "What is entropy?")
    quiet = kvb("-q", "query", "--generate", "--json", "-n", "4", "What is entropy?")
    assert "notice: no trained draft" in loud.stderr and "notice:" not in quiet.stderr
    assert json.loads(quiet.stdout)["output_ids"] == json.loads(loud.stdout)["output_ids"]
