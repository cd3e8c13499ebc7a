"""Property-based (hypothesis, stateful): random sequences of add, replace, remove, build, query and export on the
library API, against a plain-dict model of the pairs. After every step: the counts match, hashes are unique, the
stored pairs are the model's; a search returns only live, built pairs (and finds an asked pair that is built); an
export holds exactly the built pairs with their text."""

from __future__ import annotations

import shutil
from collections import Counter
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from kvdb.build import Builder
from kvdb.errors import ConflictError, NotFoundError
from kvdb.export import export_caches, load_cache
from kvdb.retrieve import Retriever
from kvdb.runtime import Runtime
from kvdb.store.pairs import PairInput, add_pairs, pair_hash, remove_pairs
from tests.reliability import db, make_tiny_config

DOMAINS = ["alpha", "beta"]
QUESTIONS = [f"What is the {w} rule?" for w in ("first", "second", "third", "fourth", "fifth", "sixth")]
ANSWERS = ["It says {w} things come first.", "It says {w} things come last."]

item = st.tuples(st.sampled_from(DOMAINS), st.integers(0, len(QUESTIONS) - 1), st.integers(0, len(ANSWERS) - 1))

SHARED: dict = {}  # the tiny model's config, and its loaded model and embedder, reused by every example
CALLS: Counter = Counter()  # rules that ran to the end, over all examples


def _pair(d: str, q: int, a: int) -> PairInput:
    word = QUESTIONS[q].split()[3]
    return PairInput(domain=d, question=QUESTIONS[q], answer=ANSWERS[a].format(w=word))


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="kvdb-stateful-"))
        self.rt = Runtime.open(self.root / "home", SHARED["config"])
        self.store = self.rt.store
        self.model: dict[str, PairInput] = {}  # live pairs by hash
        self.built: set[str] = set()  # live pairs that have vectors and an embedding
        self.ever_built = False

    def teardown(self):
        self.store.dispose()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- the model of add_pairs ----------------------------------------------------------------------------------
    def _expect_add(self, items: list[PairInput], replace: bool):
        """(model after, (added, skipped, replaced)) or None if the add must be refused whole."""
        model = dict(self.model)
        counts = [0, 0, 0]
        for it in items:
            h = it.hash
            if h in model:
                counts[1] += 1
                continue
            old = next((k for k, p in model.items() if p.domain == it.domain and p.question == it.question), None)
            if old is not None:
                if not replace:
                    return None
                del model[old]
                counts[2] += 1
            else:
                counts[0] += 1
            model[h] = it
        return model, tuple(counts)

    def _add(self, raw: list, replace: bool) -> None:
        items = [_pair(*r) for r in raw]
        expected = self._expect_add(items, replace)
        if expected is None:
            with pytest.raises(ConflictError):
                add_pairs(self.store, items, self.rt.config.store, replace=replace)
            CALLS["refused add"] += 1
            return
        report = add_pairs(self.store, items, self.rt.config.store, replace=replace)
        model, counts = expected
        assert (report.added, report.skipped, report.replaced) == counts
        self.model = model
        self.built &= set(model)
        CALLS["replace" if replace else "add"] += 1

    # -- rules -----------------------------------------------------------------------------------------------------
    @rule(raw=st.lists(item, min_size=1, max_size=4))
    def add(self, raw):
        self._add(raw, replace=False)

    @rule(raw=st.lists(item, min_size=1, max_size=3))
    def replace(self, raw):
        self._add(raw, replace=True)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data):
        hashes = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=2, unique=True))
        removed = remove_pairs(self.store, [h[:16] for h in hashes])
        assert sorted(removed) == sorted(hashes)
        for h in hashes:
            del self.model[h]
            self.built.discard(h)
        CALLS["remove"] += 1

    @rule(raw=item)
    def remove_missing(self, raw):
        h = _pair(*raw).hash
        if h in self.model:
            return
        with pytest.raises(NotFoundError):
            remove_pairs(self.store, [h])
        CALLS["remove missing"] += 1

    @precondition(lambda self: set(self.model) - self.built)
    @rule()
    def build(self):
        builder = Builder(self.rt.config, self.rt.home, self.store)
        builder._lm, builder._embedder = SHARED.get("lm"), SHARED.get("embedder")  # loaded once for all examples
        report = builder.run(progress=False)
        SHARED["lm"], SHARED["embedder"] = builder._lm, builder._embedder
        assert report.failed == 0 and report.built == len(set(self.model) - self.built)
        self.built = set(self.model)
        self.ever_built |= report.built > 0  # the model is recorded with its first vectors; export needs it
        CALLS["build"] += 1

    @precondition(lambda self: self.built)
    @rule(raw=item)
    def query(self, raw):
        asked = _pair(*raw)
        retriever = Retriever(self.rt.config, self.rt.home, self.store, embedder=SHARED["embedder"], rerank=False)
        (result,) = retriever.search([asked.question], k=5)
        returned = [m.hash for m in result.matches]
        assert set(returned) <= self.built, "search returned a pair that is removed or not built"
        assert len(returned) == len(set(returned)) == min(5, len(self.built))
        for m in result.matches:
            p = self.model[m.hash]
            assert (m.domain, m.question, m.answer) == (p.domain, p.question, p.answer)
        same_question = {h for h in self.built if self.model[h].question == asked.question}
        if same_question:  # an exact question scores 1.0: it must be among the top 5
            assert same_question <= set(returned) or len(same_question) > 5
        CALLS["query"] += 1

    @precondition(lambda self: self.ever_built)
    @rule()
    def export(self):
        files = export_caches(self.rt.config, self.rt.home, self.store, out=self.root / "export")
        merged = next(f for f in files if f.domain == "all")
        cache = load_cache(merged.path)
        got = {q["hash"]: q for q in cache["qa_pairs"]}
        assert len(got) == len(cache["qa_pairs"]) == merged.pairs
        assert set(got) == self.built, "export differs from the store's built pairs"
        for h, q in got.items():
            p = self.model[h]
            assert (q["domain"], q["question"], q["answer"]) == (p.domain, p.question, p.answer)
            assert pair_hash(q["question"], q["answer"]) == h
        for i, ids in enumerate(cache["token_ids"]):
            assert cache["answer_starts"][i] < len(ids)
            assert all(v.shape[0] == len(ids) for v in cache["token_vectors"][i].values())
        for f in files:
            if f.domain != "all":
                part = load_cache(f.path)
                assert {q["hash"] for q in part["qa_pairs"]} == {h for h in self.built
                                                                 if self.model[h].domain == f.domain}
        CALLS["export"] += 1

    # -- invariants -------------------------------------------------------------------------------------------------
    @invariant()
    def store_matches_model(self):
        with db(self.rt.home.root) as conn:
            n, distinct = conn.execute("select count(*), count(distinct hash) from pairs").fetchone()
            stored = {r[0] for r in conn.execute("select hash from pairs")}
            vec = {r[0] for r in conn.execute("select pair_hash from pair_vectors")}
            emb = {r[0] for r in conn.execute("select pair_hash from embeddings")}
        assert n == distinct == len(self.model)
        assert stored == set(self.model)
        assert vec == emb == self.built


SETTINGS = settings(max_examples=40, stateful_step_count=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_random_sequences_keep_the_invariants(tmp_path_factory):
    SHARED.clear()
    SHARED["config"] = make_tiny_config(tmp_path_factory.mktemp("tiny"))
    CALLS.clear()
    try:
        run_state_machine_as_test(StoreMachine, settings=SETTINGS)
    finally:
        SHARED.clear()
    print(f"rules run: {dict(CALLS)}")
    assert set(CALLS) >= {"add", "replace", "remove", "build", "query", "export"}, CALLS
