"""The default knowledge set: 70 FAQ pairs in the seed's seven domains, shipped as package data."""

from __future__ import annotations

from importlib import resources

from kvdb.config import StoreConfig
from kvdb.store.db import Store
from kvdb.store.ingest import parse_jsonl
from kvdb.store.pairs import AddReport, add_pairs, validate

DOMAIN_DESCRIPTIONS = {
    "ai_ml": "Artificial intelligence and machine learning",
    "cs": "Computer science",
    "math": "Mathematics",
    "physics": "Physics",
    "biology": "Biology",
    "history": "History and culture",
    "economics": "Economics",
}


def example_pairs():
    text = resources.files("kvdb").joinpath("data/default_faq.jsonl").read_text(encoding="utf-8")
    return parse_jsonl("default_faq.jsonl", text, None)


def load_examples(store: Store, limits: StoreConfig) -> AddReport:
    """Add the default set; identical pairs already stored are skipped, so loading twice adds nothing."""
    items = [validate(item, limits) for item in example_pairs()]
    return add_pairs(store, items, limits, descriptions=DOMAIN_DESCRIPTIONS)
