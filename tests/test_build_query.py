"""kvdb build / query / export / import / compare on a tiny random Llama (and the real MiniLM embedder)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvdb.build import pair_sequence, PairText
from kvdb.config import Home, load_config
from kvdb.lm import load_model
from kvdb.runtime import Runtime
from kvdb.store.blobs import unpack
from tests.conftest import Kvdb, write_jsonl
from tests.tiny import make_model

PAIRS = [
    {"domain": "biology", "question": "What is photosynthesis?",
     "answer": "Plants use sunlight to turn water and carbon dioxide into sugar and oxygen."},
    {"domain": "biology", "question": "What do mitochondria do?",
     "answer": "They burn sugar with oxygen to make the cell's energy currency, ATP."},
    {"domain": "physics", "question": "Why is the sky blue?",
     "answer": "Air molecules scatter short blue wavelengths of sunlight much more than red ones."},
    {"domain": "physics", "question": "What is entropy?",
     "answer": "A measure of how many microscopic states fit a system's large-scale state."},
    {"domain": "math", "question": "What is a prime number?",
     "answer": "A whole number above one whose only divisors are one and itself, like 2, 3, 5 and 7."},
]


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    folder = make_model(tmp_path_factory.mktemp("tiny") / "llama", layers=4, hidden=64)
    cfg = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    cfg.write_text(f"model:\n  source: {folder}\nbuild:\n  batch_size: 2\n  layers: [3, -1]\n"
                   "index:\n  rerank: false\n  confident_threshold_no_rerank: 0.5\n")
    return cfg


@pytest.fixture(scope="session")
def built_home(tmp_path_factory, tiny_config) -> Path:
    home = tmp_path_factory.mktemp("built") / "home"
    kv = Kvdb(home, tiny_config)
    kv("add", "--file", str(write_jsonl(home.parent / "pairs.jsonl", PAIRS)))
    kv("build")
    return home


@pytest.fixture
def kvb(built_home, tiny_config, tmp_path) -> Kvdb:
    """A private copy of the built home."""
    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    return Kvdb(home, tiny_config)


def _vectors(home: Path) -> list[tuple]:
    with sqlite3.connect(home / "kvdb.sqlite") as conn:
        return conn.execute("select pair_hash, layers, num_tokens, answer_start, data, checksum from pair_vectors"
                            " order by pair_hash").fetchall()


def test_build_stores_exact_hidden_states(kvb: Kvdb, tiny_config):
    rt = Runtime.open(kvb.home, tiny_config)
    lm = load_model(rt.config.model, rt.home)
    rows = _vectors(kvb.home)
    assert len(rows) == len(PAIRS)
    by_hash = {p["question"]: p for p in PAIRS}
    pairs = {r["hash"]: r for r in kvb.json("list")}
    for h, layers, num_tokens, answer_start, data, checksum in rows:
        assert json.loads(layers) == [3, 4]
        pair = pairs[h]
        seq = pair_sequence(lm, PairText(h, pair["question"], pair["answer"], []))
        tensors = unpack(data, checksum, "test")
        assert tensors["token_ids"].tolist() == seq.ids and num_tokens == len(seq.ids)
        assert answer_start == seq.answer_start
        assert seq.ids[answer_start:-1] == lm.encode(by_hash[pair["question"]]["answer"])
        # Padded batching must not change any vector: compare with an unpadded forward of this pair alone.
        out = lm.model(torch.tensor([seq.ids]), output_hidden_states=True)
        for layer in (3, 4):
            got = tensors[f"layer_{layer}"].float()
            assert got.shape == (len(seq.ids), lm.hidden_size) and tensors[f"layer_{layer}"].dtype == torch.float16
            want = out.hidden_states[layer] if layer < 4 else None
            if want is not None:
                torch.testing.assert_close(got, want[0].float(), atol=2e-2, rtol=1e-2)
        assert got.abs().sum() > 0


def test_second_build_skips_without_loading_a_model(kvb: Kvdb, monkeypatch):
    import kvdb.build

    def boom(*a, **k):
        raise AssertionError("a no-op build must not load the model")

    monkeypatch.setattr(kvdb.build, "load_model", boom)
    monkeypatch.setattr(kvdb.build, "load_embedder", boom)
    result = kvb.json("build")
    assert (result["built"], result["skipped"], result["failed"]) == (0, len(PAIRS), 0)


def test_interrupted_build_resumes(tmp_path, tiny_config, monkeypatch):
    import kvdb.build

    kv = Kvdb(tmp_path / "h", tiny_config)
    kv("add", "--file", str(write_jsonl(tmp_path / "p.jsonl", PAIRS)))
    real = kvdb.build.prefill_batch
    calls = {"n": 0}

    def dies_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed mid-build
        return real(*args, **kwargs)

    monkeypatch.setattr(kvdb.build, "prefill_batch", dies_on_second)
    kv("build", ok=False)
    assert len(_vectors(kv.home)) == 2  # the first batch (batch_size 2) was committed whole
    monkeypatch.setattr(kvdb.build, "prefill_batch", real)
    result = kv.json("build")
    assert result["built"] == len(PAIRS) - 2 and result["skipped"] == 2
    assert len(_vectors(kv.home)) == len(PAIRS)


def test_rebuild_and_domain_scope(kvb: Kvdb):
    before = {r[0]: r[5] for r in _vectors(kvb.home)}
    result = kvb.json("build", "--rebuild", "--domain", "math")
    assert result["built"] == 1
    after = {r[0]: r[5] for r in _vectors(kvb.home)}
    assert after == before  # deterministic: the same vectors again
    kvb("add", "-d", "math", "-q", "What is pi?", "-a", "The ratio of a circle's circumference to its diameter.")
    assert kvb.json("build", "--domain", "physics")["built"] == 0
    assert kvb.json("build", "--domain", "math")["built"] == 1


def test_query_finds_pairs_and_json_contract(kvb: Kvdb):
    res = kvb.json("query", "What is photosynthesis?")
    assert set(res) == {"query", "confident", "matches"}
    top = res["matches"][0]
    assert set(top) >= {"hash", "domain", "question", "answer", "score", "metadata"}
    assert top["question"] == "What is photosynthesis?" and top["score"] > 0.99 and res["confident"]
    assert len(res["matches"]) == 3
    res = kvb.json("query", "-k", "1", "How do plants make sugar from light?")
    assert [m["question"] for m in res["matches"]] == ["What is photosynthesis?"]
    res = kvb.json("query", "-k", "5", "--domain", "physics", "What is photosynthesis?")
    assert {m["domain"] for m in res["matches"]} == {"physics"} and len(res["matches"]) == 2
    off = kvb.json("query", "How long should I boil an egg?")
    assert off["confident"] is False


def test_query_file_one_line_each_in_order(kvb: Kvdb, tmp_path):
    queries = ["What is entropy?", "Why is the sky blue?", "What is a prime number?"]
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": q, "id": i} for i, q in enumerate(queries)])
    out = kvb("query", "--file", str(path), "--json").stdout.strip().splitlines()
    assert [json.loads(line)["matches"][0]["question"] for line in out] == queries
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "ok?"}\n{"q": 1}\n')
    assert ":2: needs a non-empty 'query'" in kvb("query", "--file", str(bad), ok=False).stderr


@pytest.mark.parametrize("args, needle", [
    (["   "], "the query is empty"),
    (["x?", "--domain", "nope"], "no domain named 'nope'"),
    ([], "give a QUESTION or --file"),
])
def test_query_bad_input(kvb: Kvdb, args, needle):
    assert needle in kvb("query", *args, ok=False).stderr


def test_query_before_build_is_a_clear_error(tmp_path, tiny_config):
    kv = Kvdb(tmp_path / "h", tiny_config)
    kv("add", "-d", "cs", "-q", "q?", "-a", "a.")
    assert "run `kvdb build`" in kv("query", "q?", ok=False).stderr


def test_removed_pair_leaves_search_and_added_pair_joins(kvb: Kvdb):
    top = kvb.json("query", "What is entropy?")["matches"][0]
    kvb("remove", top["hash"])
    assert all(m["question"] != "What is entropy?" for m in kvb.json("query", "-k", "5", "What is entropy?")["matches"])
    kvb("add", "-d", "cs", "-q", "What is a hash table?", "-a", "A map from keys to slots via a hash function.")
    kvb("build")
    assert kvb.json("query", "What is a hash table?")["matches"][0]["question"] == "What is a hash table?"


def test_corrupt_index_is_rebuilt(kvb: Kvdb):
    faiss_files = list((kvb.home / "index").rglob("index.faiss"))
    assert faiss_files
    data = bytearray(faiss_files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    faiss_files[0].write_bytes(bytes(data))
    res = kvb("query", "--json", "What is entropy?")
    assert json.loads(res.stdout)["matches"][0]["question"] == "What is entropy?"
    assert "rebuilding it from the store" in res.stderr


def test_export_import_round_trip(kvb: Kvdb, tmp_path, tiny_config):
    files = kvb.json("export", "--out", str(tmp_path / "out"))
    names = sorted(Path(f["path"]).name for f in files)
    assert names == ["knowledge_cache.pth", "knowledge_cache_biology.pth", "knowledge_cache_math.pth",
                     "knowledge_cache_physics.pth"]
    merged = tmp_path / "out" / "knowledge_cache.pth"
    obj = torch.load(merged, weights_only=True)
    assert obj["format"] == "kvdb.knowledge_cache" and obj["model"]["layers"] == [3, 4]
    assert [p["hash"] for p in obj["qa_pairs"]] == [r["hash"] for r in kvb.json("list")]
    vectors = {r[0]: unpack(r[4], r[5], "t") for r in _vectors(kvb.home)}
    for pair, ids, vecs, start in zip(obj["qa_pairs"], obj["token_ids"], obj["token_vectors"], obj["answer_starts"]):
        assert torch.equal(ids, vectors[pair["hash"]]["token_ids"])
        assert torch.equal(vecs["layer_3"], vectors[pair["hash"]]["layer_3"])
        assert 0 < start < len(ids)
    first = merged.read_bytes()
    kvb("export", "--out", str(tmp_path / "out"))
    assert merged.read_bytes() == first  # same store, same bytes
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left
    other = Kvdb(tmp_path / "h2", tiny_config)
    report = other.json("import", str(merged))
    assert report["added"] == len(PAIRS) and report["vectors"] == len(PAIRS)
    assert other.json("import", str(merged))["added"] == 0
    other("export", "--out", str(tmp_path / "out2"))
    assert (tmp_path / "out2" / "knowledge_cache.pth").read_bytes() == first
    assert other.json("build")["built"] == 0  # vectors were reused
    only = kvb.json("export", "--domain", "math", "--out", str(tmp_path / "one"))
    assert [Path(f["path"]).name for f in only] == ["knowledge_cache_math.pth"] and only[0]["pairs"] == 1


def test_import_from_another_model_keeps_pairs_only(kvb: Kvdb, tmp_path, tiny_config):
    kvb("export", "--out", str(tmp_path / "out"))
    folder = make_model(tmp_path / "other", layers=4, hidden=64, seed=1)
    cfg = tmp_path / "other.yaml"
    cfg.write_text(tiny_config.read_text().replace(str(load_config(tiny_config).model.source), str(folder)))
    other = Kvdb(tmp_path / "h2", cfg)
    report = other.json("import", str(tmp_path / "out" / "knowledge_cache.pth"))
    assert report["added"] == len(PAIRS) and report["vectors"] == 0 and "another model" in report["vectors_skipped_reason"]
    assert other.json("build")["built"] == len(PAIRS)


def test_hostile_or_foreign_pth_is_refused(kvb: Kvdb, tmp_path):
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"format": "kvdb.knowledge_cache", "x": Evil()}, f)
    torch.save({"format": "kvdb.knowledge_cache", "version": 1, "payload": Evil()}, tmp_path / "evil_zip.pth")
    torch.save({"some": torch.zeros(2)}, tmp_path / "foreign.pth")
    (tmp_path / "trunc.pth").write_bytes((kvb.home / "kvdb.sqlite").read_bytes()[:100])
    before = kvb.count()
    for name, needle in [("evil.pth", "not"), ("evil_zip.pth", "not a safe kvdb cache"),
                         ("foreign.pth", "not a kvdb knowledge cache"), ("trunc.pth", "not a readable kvdb cache"),
                         ("missing.pth", "does not exist")]:
        res = kvb("import", str(tmp_path / name), ok=False)
        assert needle in res.stderr, (name, res.stderr)
    assert not sentinel.exists()
    assert kvb.count() == before


def test_export_errors(kvb: Kvdb, tmp_path, tiny_config):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a folder cannot be made under a file, even by root
    assert "cannot create the export folder" in kvb("export", "--out", str(blocker / "sub"), ok=False).stderr
    fresh = Kvdb(tmp_path / "fresh", tiny_config)
    fresh("add", "-d", "cs", "-q", "q?", "-a", "a.")
    assert "run `kvdb build` first" in fresh("export", ok=False).stderr
    assert "no domain named" in kvb("export", "--domain", "nope", ok=False).stderr


def test_compare(kvb: Kvdb):
    same = kvb.json("compare", "Plants make sugar from light.", "Plants make sugar from light.")
    assert same["exact"] and same["cosine"] > 0.999 and same["token_f1"] == 1.0
    diff = kvb.json("compare", "Plants make sugar from light.", "The stock market fell today.")
    assert diff["cosine"] < 0.5 and diff["token_f1"] == 0.0
    assert "non-empty" in kvb("compare", "", "x", ok=False).stderr


def test_fingerprint_ignores_dtype(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    home = Home.resolve(tmp_path)
    a = load_model(cfg.model, home, dtype="float32")
    b = load_model(cfg.model, home, dtype="bfloat16")
    assert a.fingerprint == b.fingerprint and b.dtype == torch.bfloat16


def test_rerank_reorders_candidates_by_model_score(kvb: Kvdb, tiny_config):
    from kvdb.retrieve import Retriever

    rt = Runtime.open(kvb.home, tiny_config)
    plain = Retriever(rt.config, rt.home, rt.store, rerank=False).search(["How do plants make sugar?"], 5)[0]
    reranked = Retriever(rt.config, rt.home, rt.store, rerank=True).search(["How do plants make sugar?"], 5)[0]
    assert {m.hash for m in reranked.matches} == {m.hash for m in plain.matches}
    scores = [m.score for m in reranked.matches]
    assert scores == sorted(scores, reverse=True)
    assert scores != [m.score for m in plain.matches]  # the model's PMI moved them


def test_generate_is_lossless_and_records_answers(kvb: Kvdb, tiny_config):
    rt = Runtime.open(kvb.home, tiny_config)
    lm = load_model(rt.config.model, rt.home)
    questions = ["What is entropy?", "How do plants make sugar?", "Why is the sky blue?"]
    for q in questions:
        first = kvb.json("query", "--generate", "-n", "24", q)
        assert set(first) >= {"query", "confident", "matches", "answer", "prompt_ids", "output_ids", "stats"}
        assert set(first["stats"]) >= {"seconds", "new_tokens", "verify_steps", "drafted", "accepted"}
        want = lm.model.generate(torch.tensor([first["prompt_ids"]]), do_sample=False, max_new_tokens=24)
        assert first["output_ids"] == want[0, len(first["prompt_ids"]):].tolist()
        assert first["answer"] == lm.decode(first["output_ids"])
    # The stored question asked again: its recorded answer is the draft, verified in far fewer steps.
    again = kvb.json("query", "--generate", "-n", "24", "What is entropy?")
    assert again["output_ids"] == kvb.json("query", "--generate", "-n", "24", "What is entropy?")["output_ids"]
    assert again["stats"]["verify_steps"] < again["stats"]["new_tokens"] // 2


def test_generate_bad_input(kvb: Kvdb):
    assert "between 1 and 4096" in kvb("query", "--generate", "-n", "0", "What is entropy?", ok=False).stderr
    assert "go with --generate" in kvb("query", "-n", "5", "What is entropy?", ok=False).stderr
    assert "does not exist" in kvb("query", "--generate", "--draft", "/nope.pth", "x?", ok=False).stderr
    long_q = "word " * 1900
    assert "exceeds the model's context" in kvb("query", "--generate", "-n", "200", long_q, ok=False).stderr


def test_train_cli_then_generate_with_the_draft_stays_lossless(kvb: Kvdb, tiny_config, tmp_path):
    result = kvb.json("train", "--epochs", "2")
    ckpts = sorted(p.name for p in (kvb.home / "checkpoints").glob("*.pth"))
    assert any(n.startswith("best_draft_model_epoch") for n in ckpts), ckpts
    best = next((kvb.home / "checkpoints").glob("best_draft_model_epoch*.pth"))
    payload = torch.load(best, weights_only=True)
    assert isinstance(payload, dict) and result
    rt = Runtime.open(kvb.home, tiny_config)
    lm = load_model(rt.config.model, rt.home)
    out = kvb.json("query", "--generate", "-n", "16", "How do plants make sugar?")
    assert out["draft"] and out["draft"].endswith(".pth")
    want = lm.model.generate(torch.tensor([out["prompt_ids"]]), do_sample=False, max_new_tokens=16)
    assert out["output_ids"] == want[0, len(out["prompt_ids"]):].tolist()
    assert "does not exist" in kvb("train", "--cache", str(tmp_path / "missing.pth"), ok=False).stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux-only (a no-op elsewhere)")
def test_released_pages_of_a_cache_read_back_intact(tmp_path):
    """Import drops the mapped pages of pairs it has read; a page read again must come back from the file intact,
    and memory that is not the cache file's mapping is never released."""
    from kvdb.export import FORMAT, VERSION, load_cache, mapped_ranges, release_pages, write_pth_streaming

    gen = torch.Generator().manual_seed(0)
    vectors = [{"layer_1": torch.randn(40 + i, 256, generator=gen).half()} for i in range(3)]
    ids = [torch.arange(5 + i) for i in range(3)]
    obj = {"format": FORMAT, "version": VERSION, "domain": "all", "model": {}, "embedder": {},
           "qa_pairs": [{"hash": str(i)} for i in range(3)], "token_ids": ids,
           "token_vectors": vectors, "answer_starts": [1] * 3, "embeddings": [torch.ones(2) * i for i in range(3)],
           "embedding_fields": [{"question": torch.ones(1, 2) * i} for i in range(3)]}
    write_pth_streaming(tmp_path / "c.pth", obj)
    loaded = load_cache(tmp_path / "c.pth")
    ranges = mapped_ranges(tmp_path / "c.pth")
    assert ranges
    assert release_pages(obj, 0, 3, ranges) == 0  # the in-memory originals are not in the file's mapping
    assert release_pages(loaded, 0, 2, ranges) >= 2 * 20 * 1024  # pairs 0 and 1, vectors of 20 KiB and more
    for i in range(3):
        assert torch.equal(vectors[i]["layer_1"], loaded["token_vectors"][i]["layer_1"])
        assert torch.equal(ids[i], loaded["token_ids"][i])
        assert torch.equal(obj["embedding_fields"][i]["question"], loaded["embedding_fields"][i]["question"])


def test_noop_build_does_not_import_torch(kvb: Kvdb, tiny_config):
    """Nothing to build is answered from the store and the index description alone; a missing index still is built."""
    script = ("import json, sys\nfrom kvdb.cli import cli\n"
              "cli.main(sys.argv[1:], prog_name='kvdb', standalone_mode=False)\n"
              "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules)))\n")
    args = [sys.executable, "-c", script, "--home", str(kvb.home), "--config", str(tiny_config), "build", "--json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    report, heavy = json.loads("\n".join(out[:-1])), json.loads(out[-1])
    assert report["built"] == 0 and report["skipped"] == len(PAIRS) and report["indexed_pairs"] == len(PAIRS)
    assert heavy == []
    for f in (kvb.home / "index").rglob("index.faiss"):
        f.unlink()
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert json.loads("\n".join(out[:-1]))["indexed_pairs"] == len(PAIRS) and "faiss" in json.loads(out[-1])
    assert list((kvb.home / "index").rglob("index.faiss"))  # the slow path rebuilt and saved it
