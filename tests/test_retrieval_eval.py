"""benchmarks/eval_retrieval.py's held-out protocol: a set is scored by a fit that never saw its queries (the other
fold of its own set, or only the sets of other sources), and the operating point lets at most 2.5% of each training
set's unanswerable questions through."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from eval_retrieval import held_out  # noqa: E402
from fit_confidence import UNANSWERABLE_PASS, operating_point  # noqa: E402
from retrieval_sets import Row  # noqa: E402


def row(set_: str, cos: float, answerable: bool, fold: int = 0) -> Row:
    gold = "q" if answerable else None
    return Row(set_, "hard" if answerable else "unanswerable", gold, fold, {"q": cos, "other": cos / 2}, {})


def test_operating_point_holds_every_set_to_the_pass_rate():
    rng = np.random.default_rng(0)
    rows = [row("a", float(c), False) for c in rng.uniform(0, 0.5, 200)] + \
           [row("b", float(c), False) for c in rng.uniform(0, 0.9, 200)]
    scores = np.array([r.cos["q"] for r in rows])
    t = operating_point(rows, scores)
    for name in ("a", "b"):
        una = scores[[r.set == name for r in rows]]
        assert (una >= t).mean() <= UNANSWERABLE_PASS
    assert t > 0.85  # set b, the harder one, decides


@pytest.mark.parametrize("method", ["dense", "calibrated"])
def test_a_set_is_scored_by_a_fit_that_never_saw_it(method):
    # "default" family: answerable queries near 0.9, unanswerable near 0.3, in two folds;
    # "construction" family: unanswerable questions that score up to 0.95 (a threshold fitted on it would be high)
    rows = {
        "default": [row("default", 0.9, True, f) for f in (0, 1) for _ in range(20)] +
                   [row("default", 0.3, False, f) for f in (0, 1) for _ in range(20)],
        "construction": [row("construction", c, False) for c in np.linspace(0.2, 0.95, 40)],
        "default-offtopic": [row("default-offtopic", 0.1, False) for _ in range(10)],
    }
    _, _, t_default = held_out(rows, "default", method, 0.3, "e")
    _, _, t_con = held_out(rows, "construction", method, 0.3, "e")
    _, _, t_off = held_out(rows, "default-offtopic", method, 0.3, "e")
    # the construction set's own hard negatives never set its threshold, nor does its offtopic sibling (same source)
    if method == "dense":
        assert np.all(t_con < 0.9) and np.all(t_off < 0.9)
        assert np.all(t_default > 0.9)  # the default set's folds are held to construction's negatives
    assert len(t_default) == 80 and len(t_con) == 40 and len(t_off) == 10


def test_stackfaq_file_is_read_with_its_quirks(tmp_path, monkeypatch):
    from retrieval_sets import stackfaq_sets, stackfaq_threads

    doc = {"root": {"qapair": [
        {"rephr": ["How do I cross out text?", "*", None, "Strikethrough in markdown?"],
         "question": "Strikethrough with GitHub Markdown", "answer": ["Use ~~tildes~~.", "Or <del>."]},
        {"rephr": ["Remove my FB account", "*"], "question": "How do I delete my Facebook account?",
         "answer": "Go to the help page."},  # a lone string, not a list
        {"rephr": ["Can I add styles to docs?"], "question": "How do I add new styles to Google docs?",
         "answer": ["Not yet."]},
    ]}}
    path = tmp_path / "stackExchange-FAQ.json"
    path.write_text(__import__("json").dumps(doc))
    monkeypatch.delenv("KVDB_STACKFAQ", raising=False)
    assert stackfaq_threads() is None and stackfaq_sets() == []  # no copy named: the sets are skipped
    threads = stackfaq_threads(str(path))
    assert [t["rephrasings"] for t in threads][0] == ["How do I cross out text?", "Strikethrough in markdown?"]
    assert [t["answer"] for t in threads] == ["Use ~~tildes~~.", "Go to the help page.", "Not yet."]
    full, half = stackfaq_sets(str(path))
    assert (full.name, len(full.pairs), len(full.queries)) == ("stackfaq", 3, 4)
    kinds = {q["query"]: q["kind"] for q in full.queries}
    assert kinds["How do I cross out text?"] == "hard"  # no word of the stored question
    assert kinds["Strikethrough in markdown?"] == "light"
    # every other thread stored; the rest asked as unanswerable
    assert [p["question"] for p in half.pairs] == [threads[0]["question"], threads[2]["question"]]
    assert [q["query"] for q in half.queries if q["kind"] == "unanswerable"] == ["Remove my FB account"]


def test_a_set_is_reported_at_a_lexical_weight_chosen_on_the_other_sets():
    from eval_retrieval import chosen_weight

    def paraphrase(set_: str, lexical_wins: bool) -> Row:
        # the gold pair "q" is second by cosine; its lexical score lifts it first only at a weight of 0.5 or more
        lex = {"q": 0.9, "other": 0.0} if lexical_wins else {"q": 0.0, "other": 0.9}
        return Row(set_, "hard", "q", 0, {"q": 0.5, "other": 0.7}, lex)

    by_set = {"default": [paraphrase("default", True)] * 4,  # lexical helps here...
              "stackfaq": [paraphrase("stackfaq", False)] * 4}  # ...and misleads here
    grid = [0.0, 0.5]
    assert chosen_weight(by_set, "default", grid) == 0.0  # chosen on stackfaq, not on itself
    assert chosen_weight(by_set, "stackfaq", grid) == 0.5  # chosen on default
