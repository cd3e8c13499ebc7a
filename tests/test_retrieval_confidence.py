"""The calibrated ``confident``: its features, the logistic fit, the shipped calibration, and the query path that
uses it (``--min-score`` and ``index.min_confidence`` move the operating point; a configured score threshold keeps
the plain rule)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvdb import confidence
from kvdb.confidence import FEATURES, Calibrator, features, fit, logistic, shipped
from kvdb.config import load_config
from kvdb.errors import ConfigError
from kvdb.runtime import Runtime
from tests.conftest import Kvdb
from tests.test_build_query import built_home, kvb, tiny_config  # noqa: F401 - fixtures

OFF_TOPIC = "How long should I boil an egg for a soft yolk?"


def test_features_describe_the_best_candidate_and_its_runners_up():
    cos = {1: 0.8, 2: 0.6, 3: 0.7}
    lex = {2: 0.5, 1: 0.4}
    x = dict(zip(FEATURES, features(cos, lex, weight=0.5)))
    # fused: 1 -> 1.0, 2 -> 0.85, 3 -> 0.7
    assert x["cosine"] == pytest.approx(0.8) and x["lexical"] == pytest.approx(0.4)
    assert x["fused_margin"] == pytest.approx(0.15)
    assert x["dense_margin"] == pytest.approx(0.1)
    assert x["agree"] == 0.0  # lexical search ranks pair 2 first
    assert x["lexical_best"] == pytest.approx(0.5) and x["lexical_margin"] == pytest.approx(0.1)
    agree = dict(zip(FEATURES, features({1: 0.8, 2: 0.6}, {1: 0.5}, weight=0.5)))
    assert agree["agree"] == 1.0 and agree["lexical_margin"] == pytest.approx(0.5)
    assert not features({}, {}, 0.3).any()


def test_fit_recovers_the_weights_of_a_logistic_sample():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2))
    y = (rng.random(20000) < logistic(0.5 + x @ np.array([2.0, -1.0]))).astype(float)
    coef, bias = fit(x, y, l2=0.0)
    # balanced class weights shift the bias only; the slopes are the generating ones
    assert coef == pytest.approx([2.0, -1.0], abs=0.1)
    p = logistic(bias + x @ coef)
    assert p[y == 1].mean() > p[y == 0].mean()


def test_the_shipped_calibration_loads_and_rejects_other_features():
    c = shipped()
    assert c.uses and set(c.uses) <= set(FEATURES) and len(c.coef) == len(c.uses) and 0 < c.threshold <= 1
    assert c.embedder == "all-MiniLM-L6-v2"
    assert Calibrator.from_dict(c.as_dict()) == c
    with pytest.raises(ConfigError, match="refit"):
        Calibrator.from_dict({**c.as_dict(), "features": ["cosine", "no such feature"], "coef": [1.0, 1.0]})
    with pytest.raises(ConfigError, match="refit"):
        Calibrator.from_dict({**c.as_dict(), "features": list(FEATURES)})  # fewer weights than features


def test_a_calibrator_reads_only_the_features_it_uses():
    c = Calibrator(("dense_margin", "cosine"), (2.0, -1.0), 0.5, 0.5, 0.3, "e")
    x = np.zeros(len(FEATURES))
    x[FEATURES.index("cosine")], x[FEATURES.index("dense_margin")], x[FEATURES.index("lexical")] = 0.25, 0.5, 9.0
    assert float(c.probability(x)) == pytest.approx(float(logistic(0.5 + 2.0 * 0.5 - 0.25)))
    assert c.probability(np.stack([x, x])).shape == (2,)


@pytest.fixture
def calibrated_config(tiny_config, tmp_path) -> Path:  # noqa: F811
    """The tiny test config with the default confident rule (no score threshold configured)."""
    text = tiny_config.read_text().replace("  confident_threshold_no_rerank: 0.5\n", "")
    assert "confident_threshold_no_rerank" not in text
    path = tmp_path / "calibrated.yaml"
    path.write_text(text)
    return path


def test_confident_is_the_calibrated_probability_at_the_operating_point(kvb: Kvdb, calibrated_config):  # noqa: F811
    from kvdb.retrieve import Retriever

    rt = Runtime.open(kvb.home, calibrated_config)
    retriever = Retriever(rt.config, rt.home, rt.store)
    queries = ["Why is the sky blue?", OFF_TOPIC]
    sure, off = retriever.search(queries, 3)
    assert sure.confident and sure.confidence >= shipped().threshold
    assert not off.confident and off.confidence < shipped().threshold
    index = retriever.index()
    found = retriever.candidates(index, queries, retriever.embedder().embed(queries), 20, None, None)
    for result, (cos, lex) in zip((sure, off), found):
        expected = shipped().probability(features(cos, lex, rt.config.index.lexical_weight))
        assert result.confidence == pytest.approx(float(expected))
    (everything,) = retriever.search([OFF_TOPIC], 3, min_score=0.0)
    assert everything.confident


def test_min_score_and_min_confidence_move_the_operating_point(kvb: Kvdb, calibrated_config, tmp_path):  # noqa: F811
    cli = Kvdb(kvb.home, calibrated_config)
    assert cli.json("query", OFF_TOPIC)["confident"] is False
    low = cli.json("query", OFF_TOPIC, "--min-score", "0")
    assert low["confident"] is True and set(low) == {"query", "confident", "matches"}
    assert cli.json("query", "Why is the sky blue?", "--min-score", "1.01")["confident"] is False
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text(calibrated_config.read_text().replace("index:\n", "index:\n  min_confidence: 0.0\n"))
    assert Kvdb(kvb.home, lenient).json("query", OFF_TOPIC)["confident"] is True


def test_min_confidence_is_a_probability(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("index:\n  min_confidence: 1.5\n")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        load_config(bad)


def test_a_configured_score_threshold_keeps_the_plain_rule(kvb: Kvdb, tiny_config):  # noqa: F811
    from kvdb.retrieve import Retriever

    rt = Runtime.open(kvb.home, tiny_config)  # confident_threshold_no_rerank: 0.5
    retriever = Retriever(rt.config, rt.home, rt.store)
    assert retriever.confidence_rule(None) == (None, 0.5)
    (off,) = retriever.search([OFF_TOPIC], 3)
    assert off.confidence is None and off.confident == (off.matches[0].score >= 0.5)


def test_calibration_file_is_package_data():
    """The file is there, and setup.cfg puts it in the wheel (kvdb.data's patterns match it)."""
    import configparser
    import fnmatch
    from importlib import resources

    assert resources.files("kvdb").joinpath(confidence.CALIBRATION_FILE).is_file()
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["kvdb.data"].split(",")]
    assert any(fnmatch.fnmatch(Path(confidence.CALIBRATION_FILE).name, p) for p in patterns)


def test_another_embedder_is_told_the_calibration_is_not_its_own(kvb: Kvdb, calibrated_config):  # noqa: F811
    from dataclasses import replace

    from kvdb.retrieve import Retriever

    rt = Runtime.open(kvb.home, calibrated_config)
    retriever = Retriever(rt.config, rt.home, rt.store)
    retriever.search(["Why is the sky blue?"], 1)
    assert retriever.notices == []
    retriever.ref = replace(retriever.ref, name="some-other-embedder")
    retriever.search(["Why is the sky blue?"], 1)
    retriever.search(["Why is the sky blue?"], 1)
    assert len(retriever.notices) == 1 and "some-other-embedder" in retriever.notices[0]
