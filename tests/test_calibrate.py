"""`kvdb calibrate`: the lowest operating point at which at most the target share of a store's unanswerable questions
is called confident, from its own labelled questions."""

from __future__ import annotations

import json

import pytest

from kvdb.calibrate import Labelled, parse, report
from kvdb.errors import ValidationError
from kvdb.retrieve import Match, QueryResult
from tests.conftest import Kvdb
from tests.test_build_query import built_home, kvb, tiny_config  # noqa: F401 - fixtures
from tests.test_retrieval_confidence import OFF_TOPIC, calibrated_config  # noqa: F401 - fixture


def result(p: float, top: str) -> QueryResult:
    return QueryResult("q", False, [Match("ab" * 32, "d", top, "an answer", 1.0)], p)


def test_the_chosen_point_is_the_lowest_that_keeps_to_the_target():
    labelled = [Labelled(f"a{i}", "Q") for i in range(4)] + [Labelled(f"u{i}", None) for i in range(10)]
    # answerable: 0.9, 0.7, 0.5 found; 0.95 retrieves another pair. unanswerable: 0.05 .. 0.6 and one at 0.8
    results = [result(0.9, "Q"), result(0.7, "Q"), result(0.5, "Q"), result(0.95, "other")] + \
              [result(p, "other") for p in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)]
    r = report(labelled, results, target=0.1, current=0.85)
    assert (r.answerable, r.unanswerable, r.recall_at_1) == (4, 10, 0.75)
    # one unanswerable question of ten may pass: the point sits just above the runner-up, 0.6
    assert 0.6 < r.chosen.min_confidence <= 0.6001
    assert r.chosen.unanswerable_confident == pytest.approx(0.1)
    assert r.chosen.answerable_confident == pytest.approx(0.5)  # 0.9 and 0.7; 0.95 found the wrong pair
    assert r.current.min_confidence == 0.85
    assert (r.current.answerable_confident, r.current.unanswerable_confident) == (0.25, 0.0)
    strict = report(labelled, results, target=0.0, current=0.85)
    assert strict.chosen.unanswerable_confident == 0.0 and 0.8 < strict.chosen.min_confidence <= 0.8001
    assert json.loads(json.dumps(r.to_dict()))["chosen"]["min_confidence"] == r.chosen.min_confidence


def test_labelled_questions_are_checked():
    items = [("f:1", {"query": "a?", "question": "Q"}), ("f:2", {"query": "b?", "hash": "abababab"}),
             ("f:3", {"query": "c?", "answerable": False})]
    a, b, c = parse(items)
    assert (a.expect, b.expect, c.expect) == ("Q", "abababab", None)
    assert b.found(result(0.5, "not Q")) and a.found(result(0.5, "Q")) and not c.found(result(0.5, "Q"))
    assert not Labelled("b?", "abab").found(result(0.5, "x"))  # a hash prefix needs 8 characters
    with pytest.raises(ValidationError, match="f:9: needs a non-empty 'query'"):
        parse([("f:9", {"question": "Q"})])
    with pytest.raises(ValidationError, match="f:9: needs the stored 'question'"):
        parse([("f:9", {"query": "a?"})])
    with pytest.raises(ValidationError, match="answerable and unanswerable"):
        report([a], [result(0.5, "Q")], 0.05, 0.5)


def test_calibrate_command_reports_a_point_that_query_honours(kvb: Kvdb, calibrated_config, tmp_path):  # noqa: F811
    cli = Kvdb(kvb.home, calibrated_config)
    path = tmp_path / "labelled.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"query": "Why is the sky blue?", "question": "Why is the sky blue?"},
        {"query": "What is photosynthesis?", "question": "What is photosynthesis?"},
        {"query": OFF_TOPIC, "answerable": False},
        {"query": "Who painted the Mona Lisa?", "answerable": False},
    ]) + "\n")
    out = cli.json("calibrate", str(path), "--target", "0")
    assert (out["answerable"], out["unanswerable"], out["recall_at_1"]) == (2, 2, 1.0)
    point = out["chosen"]["min_confidence"]
    assert out["chosen"]["unanswerable_confident"] == 0.0
    for question in (OFF_TOPIC, "Who painted the Mona Lisa?"):  # what the report says, kvdb query does
        assert cli.json("query", question, "--min-score", str(point))["confident"] is False
    kept = [cli.json("query", q, "--min-score", str(point))["confident"]
            for q in ("Why is the sky blue?", "What is photosynthesis?")]
    assert sum(kept) / 2 == out["chosen"]["answerable_confident"]
    assert "set index.min_confidence:" in cli("calibrate", str(path)).stdout


def test_calibrate_refuses_a_score_threshold_config_and_bad_files(kvb: Kvdb, tmp_path):  # noqa: F811
    path = tmp_path / "labelled.jsonl"
    path.write_text('{"query": "Why is the sky blue?", "question": "Why is the sky blue?"}\n'
                    '{"query": "Who painted the Mona Lisa?", "answerable": false}\n')
    refused = kvb("calibrate", str(path), ok=False)  # the tiny config sets confident_threshold_no_rerank
    assert "score threshold" in refused.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "x?"}\n')
    assert f"{bad}:1: needs the stored 'question'" in kvb("calibrate", str(bad), ok=False).output
