"""Compare text embedders on every FAQ set of benchmarks/retrieval_sets.py: recall with the embedder alone (dense)
and fused with the store's lexical search, the held-out ``confident`` of each, and the cost of one query.

    PYTHONPATH=. .venv/bin/python benchmarks/compare_embedders.py [--embedder SOURCE ...] [--out FILE]

SOURCE is anything ``embedder.source`` takes: ``embedded:minilm`` (the default), ``embedded:mpnet``, a
sentence-transformers folder. Each embedder gets its own stores (the sets' pairs embedded with it) and its own
calibrator: the recall and confident figures are those of benchmarks/eval_retrieval.py (``evaluate``: held out by
fold and by source, the threshold letting at most 2.5% of each training set's unanswerable questions through, the
fusion weight chosen on the other sets), so the lines of two embedders compare like for like. ``threshold (all)`` and ``calibration`` are the fit on every set:
what a shipped calibration file for that embedder would hold (benchmarks/fit_confidence.py writes it when
``KVDB_CONFIG`` names a config with that embedder).

Latency, per embedder, on the default set's store, models loaded and warm: ``embed_ms`` is the median of 50 runs of
one short query's embedding (one CPU thread: kvdb.embed embeds a few tokens on one), ``search_ms`` the median of one
query's whole default search (embedding, FAISS, full-text search, fusion, calibrated confident) over 50 queries.

``--out`` merges into an existing file: lines of embedders not measured in this run are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_retrieval import LEXICAL_WEIGHTS, chosen_weight, evaluate  # noqa: E402
from fit_confidence import train  # noqa: E402
from retrieval_sets import Row, all_sets, collect, prepare  # noqa: E402

from kvdb.config import CONFIG_DIR  # noqa: E402
from kvdb.retrieve import Retriever  # noqa: E402

METHODS = ("dense", "fused", "calibrated")
COLUMNS = ("recall@1", "recall@1_hard", "recall@5", "paraphrases_confident", "unanswerable_confident")
LATENCY_RUNS = 50
SHORT_QUERY = "how do I reset my password"


@contextmanager
def embedder_config(source: str):
    """KVDB_CONFIG names, inside the block, the default config with ``embedder.source`` set to ``source``."""
    data = yaml.safe_load((CONFIG_DIR / "default.yaml").read_text(encoding="utf-8")) or {}
    data.setdefault("embedder", {})["source"] = source
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="kvdb-embedder-", delete=False) as f:
        yaml.safe_dump(data, f)
    before = os.environ.get("KVDB_CONFIG")
    os.environ["KVDB_CONFIG"] = f.name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("KVDB_CONFIG", None)
        else:
            os.environ["KVDB_CONFIG"] = before
        os.unlink(f.name)


def median_ms(fn, args: list) -> float:
    """Median milliseconds of ``fn(a)`` over ``args``, after one warm-up call."""
    fn(args[0])
    times = []
    for a in args:
        t = time.perf_counter()
        fn(a)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def latency(retriever: Retriever, queries: list[str]) -> dict[str, float]:
    embedder = retriever.embedder()
    return {
        "embed_ms": median_ms(lambda q: embedder.embed([q]), [SHORT_QUERY] * LATENCY_RUNS),
        "search_ms": median_ms(lambda q: retriever.search([q], 5), queries[:LATENCY_RUNS]),
    }


def measure(source: str) -> dict:
    """Every set's rows, method results and latency for one embedder source."""
    by_set: dict[str, list[Row]] = {}
    info: dict = {"source": source}
    with embedder_config(source):
        for faq in all_sets():
            t = time.perf_counter()
            rt = prepare(faq)
            retriever = Retriever(rt.config, rt.home, rt.store, rerank=False)
            weight, name = rt.config.index.lexical_weight, retriever.ref.name
            by_set[faq.name] = collect(retriever, faq)
            print(f"{name}: {faq.name} embedded and searched in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            if faq.name == "default":
                info.update(key=retriever.ref.key, dim=retriever.embedder().dim,
                            **latency(retriever, [it["query"] for it in faq.queries]))
    every = [r for rows in by_set.values() for r in rows]
    info.update(name=name, load_average=os.getloadavg()[0], calibration=train(every, weight, name).as_dict())
    rows = []
    for set_name in by_set:
        held_weight = chosen_weight(by_set, set_name, list(LEXICAL_WEIGHTS))  # as eval_retrieval reports it
        for method in METHODS:
            r = evaluate(by_set, set_name, method, held_weight, name)
            rows.append({"embedder": name, "set": set_name, "method": method, **{c: r[c] for c in COLUMNS},
                         "threshold (all)": r["threshold (all)"], "lexical_weight": held_weight})
    return {"embedder": info, "rows": rows}


def merged(path: Path | None, runs: list[dict]) -> dict:
    """The file's embedders and rows (if it exists), with those of ``runs`` replacing any of the same embedder."""
    doc = json.loads(path.read_text()) if path and path.exists() else {"embedders": {}, "rows": []}
    for run in runs:
        name = run["embedder"]["name"]
        doc["embedders"][name] = run["embedder"]
        doc["rows"] = [r for r in doc["rows"] if r["embedder"] != name] + run["rows"]
    return doc


def table(doc: dict) -> str:
    head = "| set | method | embedder | " + " | ".join(COLUMNS) + " | embed ms | search ms |"
    lines = [head, "|---" * (len(COLUMNS) + 5) + "|"]
    for r in sorted(doc["rows"], key=lambda r: (r["set"], METHODS.index(r["method"]), r["embedder"])):
        e = doc["embedders"][r["embedder"]]
        cells = ["-" if r[c] is None else f"{r[c]:.3f}" for c in COLUMNS]
        lines.append(f"| {r['set']} | {r['method']} | {r['embedder']} | " + " | ".join(cells)
                     + f" | {e['embed_ms']:.1f} | {e['search_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embedder", action="append", help="an embedder source (repeatable; default embedded:minilm)")
    ap.add_argument("--out", default=None, help="merge the results into this JSON file")
    ap.add_argument("--json", action="store_true", help="print one JSON line per set, method and embedder")
    args = ap.parse_args()
    runs = [measure(source) for source in args.embedder or ["embedded:minilm"]]
    doc = merged(Path(args.out) if args.out else None, runs)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        for r in doc["rows"]:
            print(json.dumps({**r, **{k: doc["embedders"][r["embedder"]][k] for k in ("embed_ms", "search_ms")}}))
        return
    print(table(doc))


if __name__ == "__main__":
    main()
