"""Hybrid retrieval: the store's full-text table kept in step with the pairs on every write path, migration 0004 on
an existing store, linear fusion of dense and lexical results, --min-score, and `query --file` streaming."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from kvdb import lexical
from kvdb.runtime import Runtime
from kvdb.store.db import Store
from tests.conftest import Kvdb, write_jsonl
from tests.test_build_query import PAIRS, built_home, kvb, tiny_config  # noqa: F401 - fixtures

TREE = {"domain": "cs", "question": "What is a binary tree?", "answer": "A tree whose nodes have at most two children.",
        "variants": ["Explain a bifurcating hierarchy", "two-way branching structure"]}
PRIME = {"domain": "math", "question": "What is a prime?", "answer": "A number divisible only by one and itself."}


def fts_rows(db: Path) -> dict[int, tuple[str, str, str | None]]:
    """The full-text table's rows by rowid, read with the standard library (independent of the code under test)."""
    with sqlite3.connect(db) as conn:
        return {r[0]: tuple(r[1:]) for r in conn.execute("select rowid, question, answer, variants from pairs_fts")}


def pair_rows(db: Path) -> dict[int, tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute("select id, question, answer from pairs")}


def assert_in_step(db: Path) -> None:
    fts, pairs = fts_rows(db), pair_rows(db)
    assert set(fts) == set(pairs)
    for pid, (q, a) in pairs.items():
        assert fts[pid][:2] == (q, a)


def test_fts_follows_add_replace_and_remove(kv: Kvdb, tmp_path):
    db = kv.home / "kvdb.sqlite"
    kv("add", "--file", str(write_jsonl(tmp_path / "p.jsonl", [TREE, PRIME])))
    assert_in_step(db)
    (tree_id,) = [pid for pid, (q, _) in pair_rows(db).items() if q == TREE["question"]]
    assert fts_rows(db)[tree_id][2] == "Explain a bifurcating hierarchy two-way branching structure"

    kv("add", "-d", "cs", "-q", TREE["question"], "-a", "A rooted tree with two children per node.", "--replace")
    assert_in_step(db)
    assert "A rooted tree with two children per node." in {a for _, a, _ in fts_rows(db).values()}
    assert TREE["answer"] not in {a for _, a, _ in fts_rows(db).values()}

    prime = [r for r in kv.json("list") if r["domain"] == "math"][0]
    kv("remove", prime["hash"][:12])
    assert_in_step(db)
    kv("remove", "--domain", "cs")
    assert fts_rows(db) == {} == pair_rows(db)


def test_fts_follows_import_and_copy(kvb: Kvdb, tmp_path, tiny_config):  # noqa: F811
    out = tmp_path / "export"
    kvb("export", "--out", str(out))
    fresh = Kvdb(tmp_path / "fresh", tiny_config)
    fresh("import", str(out / "knowledge_cache.pth"))
    assert len(fts_rows(fresh.home / "kvdb.sqlite")) == len(PAIRS)
    assert_in_step(fresh.home / "kvdb.sqlite")

    target = tmp_path / "copy.sqlite"
    kvb("db", "copy", "--to", f"sqlite:///{target}")
    assert_in_step(target)
    assert fts_rows(target) == fts_rows(kvb.home / "kvdb.sqlite")


def test_migration_0004_fills_an_existing_store_and_goes_down_cleanly(tmp_path):
    db = tmp_path / "old.sqlite"
    store = Store(f"sqlite:///{db}")
    store.upgrade("0003")
    with sqlite3.connect(db) as conn:
        conn.execute("insert into domains (id, name, description, created_at) values (1, 'cs', '', '2026-01-01')")
        conn.execute("insert into pairs (id, hash, domain_id, question, answer, question_key, metadata, created_at, "
                     "updated_at) values (7, 'h', 1, 'What is a heap?', 'A tree ordered by priority.', 'k', "
                     "'{\"variants\": [\"priority queue layout\"]}', '2026-01-01', '2026-01-01')")
    store.upgrade()
    assert fts_rows(db) == {7: ("What is a heap?", "A tree ordered by priority.", "priority queue layout")}
    with store.read() as session:
        assert [pid for pid, _ in lexical.search(session, "priority queues", 5)] == [7]

    store.downgrade("0003")
    with sqlite3.connect(db) as conn:
        left = {r[0] for r in conn.execute("select name from sqlite_master where name like 'pairs_fts%'")}
    assert left == set()
    with sqlite3.connect(db) as conn:  # the pairs table writes without its triggers
        conn.execute("update pairs set answer = 'A priority-ordered tree.' where id = 7")
    store.upgrade()
    assert fts_rows(db)[7][1] == "A priority-ordered tree."


def test_terms_drop_stop_words_and_quote_for_fts():
    assert lexical.terms("What is the 'ATP' of a cell, and what is ATP?") == ["atp", "cell"]
    assert lexical.fts_query(['say"hi', "or"]) == '"say""hi" OR "or"'


def test_lexical_search_filters_by_domain(kv: Kvdb, tmp_path):
    kv("add", "--file", str(write_jsonl(tmp_path / "p.jsonl", [TREE, PRIME, {**PRIME, "domain": "cs", "answer": "A number divisible by one and itself alone."}])))
    store = Store(f"sqlite:///{kv.home / 'kvdb.sqlite'}")
    with store.read() as session:
        everywhere = lexical.search(session, "divisible numbers", 5)
        cs = session.execute(text("select id from domains where name = 'cs'")).scalar()
        in_cs = lexical.search(session, "divisible numbers", 5, domain_id=cs)
    assert len(everywhere) == 2 and len(in_cs) == 1
    assert all(0 < s < 1 for _, s in everywhere)


def test_fusion_ranks_a_match_only_lexical_search_found(kvb: Kvdb, tiny_config, monkeypatch):  # noqa: F811
    from kvdb.retrieve import Retriever

    rt = Runtime.open(kvb.home, tiny_config)
    retriever = Retriever(rt.config, rt.home, rt.store)
    query = "Which molecule is the energy currency ATP?"
    ids = {p["question"]: p["hash"] for p in kvb.json("list")}
    (plain,) = retriever.search([query], 5)
    target = [m for m in plain.matches if m.hash == ids["What do mitochondria do?"]]
    assert target, "the test needs the mitochondria pair among the candidates"
    target_id = target[0].pair_id

    real_dense = retriever.dense

    def dense_without_target(index, vectors, depth, allowed):  # the embedder "misses" the pair
        return [{p: c for p, c in d.items() if p != target_id} for d in real_dense(index, vectors, depth, allowed)]

    monkeypatch.setattr(retriever, "dense", dense_without_target)
    (lex,) = retriever.lexical([query], 5, None)
    assert target_id in lex
    (fused,) = retriever.search([query], 5)
    found = [m for m in fused.matches if m.pair_id == target_id]
    assert found, "a pair found only by lexical search must still be ranked"
    # scored by its exact cosine, as if the embedder had found it: the same fused score either way
    assert found[0].score == pytest.approx(target[0].score, abs=1e-5)

    monkeypatch.setattr(retriever, "lexical", lambda queries, depth, domain, session=None: [{} for _ in queries])
    (dense_only,) = retriever.search([query], 5)
    assert target_id not in [m.pair_id for m in dense_only.matches]


def test_scores_are_cosine_plus_weighted_lexical(kvb: Kvdb, tiny_config):  # noqa: F811
    from kvdb.retrieve import Retriever

    rt = Runtime.open(kvb.home, tiny_config)
    retriever = Retriever(rt.config, rt.home, rt.store)
    query = "Why does sunlight scatter into a blue sky?"
    index = retriever.index()
    vectors = retriever.embedder().embed([query])
    (cos,) = retriever.dense(index, vectors, 20, None)
    (lex,) = retriever.lexical([query], 20, None)
    (result,) = retriever.search([query], 5)
    w = rt.config.index.lexical_weight
    for m in result.matches:
        assert m.score == pytest.approx(cos[m.pair_id] + w * lex.get(m.pair_id, 0.0), abs=1e-5)
    assert [m.score for m in result.matches] == sorted((m.score for m in result.matches), reverse=True)


def test_min_score_moves_confident(kvb: Kvdb):  # noqa: F811
    q = "Why is the sky blue?"
    low = kvb.json("query", q, "--min-score", "-5")
    high = kvb.json("query", q, "--min-score", "5")
    assert low["confident"] is True and high["confident"] is False
    assert low["matches"] == high["matches"]
    assert set(low) == {"query", "confident", "matches"}
    assert set(low["matches"][0]) == {"hash", "domain", "question", "answer", "score", "metadata"}
    assert "--min-score goes without --generate" in kvb("query", q, "--generate", "--min-score", "1", ok=False).output


def test_query_file_writes_each_batch_before_searching_the_next(kvb: Kvdb, tmp_path, monkeypatch):  # noqa: F811
    from kvdb import cli
    from kvdb.api import KnowledgeBase

    monkeypatch.setattr(cli, "QUERY_BATCH", 2)
    lines_before_batch = []
    real = KnowledgeBase.query_many

    def counting(self, questions, *args, **kwargs):
        lines_before_batch.append(sys.stdout.buffer.getvalue().count(b"\n"))  # what a reader has seen so far
        return real(self, questions, *args, **kwargs)

    monkeypatch.setattr(KnowledgeBase, "query_many", counting)
    queries = [p["question"] for p in PAIRS]
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": q} for q in queries])
    out = kvb("query", "--file", str(path), "--json").stdout.splitlines()
    assert lines_before_batch == [0, 2, 4]
    assert [json.loads(line)["query"] for line in out] == queries
    assert all(json.loads(line)["matches"][0]["question"] == q for line, q in zip(out, queries))


def test_lexical_search_on_postgres(pg_kv: Kvdb, pg_url, tmp_path):
    """PostgreSQL's full-text search over the same fields: stemmed words match, the domain filters, a removed pair
    is gone (the GIN index follows the table by itself)."""
    pg_kv("add", "--file", str(write_jsonl(tmp_path / "p.jsonl", [TREE, PRIME])))
    store = Store(pg_url)
    try:
        with store.read() as session:
            ids = dict(session.execute(text("select question, id from pairs")).all())
            cs = session.execute(text("select id from domains where name = 'cs'")).scalar()
            assert [p for p, _ in lexical.search(session, "bifurcating hierarchies", 5)] == [ids[TREE["question"]]]
            assert lexical.search(session, "divisible", 5, domain_id=cs) == []
            found = lexical.search(session, "divisible primes", 5)
            assert [p for p, _ in found] == [ids[PRIME["question"]]] and 0 < found[0][1] < 1
            assert lexical.search(session, "what is the", 5) == []
        prime = [r for r in pg_kv.json("list") if r["domain"] == "math"][0]
        pg_kv("remove", prime["hash"][:12])
        with store.read() as session:
            assert lexical.search(session, "divisible primes", 5) == []
    finally:
        store.dispose()


def test_words_in_many_pairs_leave_a_query_that_has_rarer_ones(kv: Kvdb, tmp_path, monkeypatch):
    common = [{"domain": "cs", "question": f"How do computers store item {i}?", "answer": f"In memory cell {i}."}
              for i in range(4)]
    kv("add", "--file", str(write_jsonl(tmp_path / "p.jsonl", [TREE, PRIME, *common])))
    store = Store(f"sqlite:///{kv.home / 'kvdb.sqlite'}")
    monkeypatch.setattr(lexical, "COMMON_PAIRS", 2)
    with store.read() as session:
        assert lexical.selective(session, ["storing", "computers", "bifurcating", "divisible"]) == \
            ["bifurcating", "divisible"]
    with store.read() as session:  # again in a fresh transaction (the query tables went with the last one)
        # "computers" and "storing" (stems of words in 4 pairs) go; two rarest words stay whatever their counts
        assert lexical.selective(session, ["storing", "computers", "bifurcating", "divisible"]) == \
            ["bifurcating", "divisible"]
        # all three in 4 pairs: the first two stay (equal counts keep the query's order)
        assert lexical.selective(session, ["memory", "storing", "computers"]) == ["memory", "storing"]
        assert lexical.selective(session, ["computers", "stored"]) == ["computers", "stored"]
        ids = dict(session.execute(text("select question, id from pairs")).all())
        found = [p for p, _ in lexical.search(session, "storing computers with bifurcating hierarchy", 5)]
        assert found == [ids[TREE["question"]]]
        monkeypatch.setattr(lexical, "COMMON_PAIRS", 100)  # more than the store's pairs: every word stays
        assert lexical.selective(session, ["storing", "computers", "memory"]) == ["storing", "computers", "memory"]
        assert len(lexical.search(session, "storing computers with bifurcating hierarchy", 5)) == 5
