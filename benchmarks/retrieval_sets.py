"""The FAQ sets retrieval is measured on, and the per-query candidates (cosine and lexical score per pair) that
benchmarks/eval_retrieval.py and benchmarks/fit_confidence.py score.

Sets:
- ``default``: kvdb's own 70 pairs (kvdb/data/default_faq.jsonl), 210 written paraphrases (70 light, 140 hard: no
  content word shared with the stored question) and 40 unanswerable questions.
- ``construction``: the Swedish Construction FAQ by Zaragoza AB (English version, 503 real Q&As of a public FAQ in
  39 categories; CC BY 4.0, DOI 10.5281/zenodo.19630803), read from its PyPI package ``zaragoza-construction-faq``
  (not copied here; ``pip install zaragoza-construction-faq``). It has no rephrasings, so it measures the other side
  of ``confident``: the pairs of every other category are stored and the questions of the rest are asked, each an
  unanswerable question *in the store's own domain* (the hard case for a threshold); the stored questions asked
  verbatim are its answerable queries (kind ``verbatim``: a user pasting the FAQ's own question).
- ``default-offtopic``: the default store asked the 503 construction questions: unanswerable, off its domains.

- ``stackfaq`` and ``stackfaq-half``: StackFAQ (Karan & Snajder, "Paraphrase-focused learning to rank for
  domain-specific frequently asked questions retrieval", Expert Systems with Applications 91, 2018): 125 StackExchange
  Web Applications threads, each with about ten rephrasings of its question written by people (1,249 in all). The
  questions and answers are StackExchange content (CC BY-SA); the file is published in
  github.com/ML-Recipes/BERT-FAQ (data/StackFAQ/stackExchange-FAQ.json). No package carries it, so it is read from a
  local copy named by ``KVDB_STACKFAQ`` and is never committed here; without it these sets are skipped. A pair is
  the thread's question with its first answer. ``stackfaq`` stores all 125 and asks every rephrasing (kind ``hard``
  when it shares no word with the stored question, ``light`` otherwise); ``stackfaq-half`` stores every other thread
  and asks the rest's rephrasings as unanswerable questions in the store's own domain.

No public paraphrase set ships in a package kvdb can install: the PyPI and npm package lists hold no package
bundling StackFAQ, BANKING77, CLINC150, HWU64, SNIPS, ATIS or Quora question pairs; chatterbot-corpus (BSD) is
dialogue, not rephrasings; snips-nlu ships a 5 kB sample.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kvdb.build import Builder, PairText
from kvdb.lexical import terms
from kvdb.retrieve import Retriever
from kvdb.runtime import Runtime
from kvdb.store.ingest import parse_jsonl
from kvdb.store.pairs import add_pairs, validate

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "kvdb" / "data"
DEPTH = 20  # candidates from each list, as index.fusion_candidates


@dataclass
class FaqSet:
    name: str
    pairs: list[dict]  # {"domain", "question", "answer", "variants"?}
    queries: list[dict]  # {"query", "kind": light|hard|verbatim|unanswerable, "source_question"?}


@dataclass
class Row:
    """One query's candidates (pair question -> cosine, lexical score, PMI) and what it should find."""

    set: str
    kind: str
    gold: str | None
    fold: int
    cos: dict[str, float]
    lex: dict[str, float]
    pmi: dict[str, float] = field(default_factory=dict)

    @property
    def answerable(self) -> bool:
        return self.kind != "unanswerable"


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def default_set() -> FaqSet:
    return FaqSet("default", load_jsonl(DATA / "default_faq.jsonl"),
                  load_jsonl(DATA / "paraphrases.jsonl") + load_jsonl(DATA / "unanswerable.jsonl"))


def construction_faq() -> list[dict] | None:
    """The English Q&As of the construction FAQ, or None when its package is not installed."""
    try:
        import zaragoza_construction_faq as zcf
    except ImportError:
        return None
    return zcf.load(lang="en")


def construction_sets() -> list[FaqSet]:
    faq = construction_faq()
    if faq is None:
        return []
    cats = sorted({q["category"] for q in faq})
    stored = set(cats[::2])
    pairs = list({q["q"]: {"domain": "construction", "question": q["q"], "answer": q["a"]}
                  for q in reversed(faq) if q["category"] in stored}.values())  # a question asked twice: its first
    known = {p["question"].casefold() for p in pairs}
    asked = [{"query": q["q"], "kind": "unanswerable"} for q in faq
             if q["category"] not in stored and q["q"].casefold() not in known]
    offtopic = [{"query": q["q"], "kind": "unanswerable"} for q in faq]
    verbatim = [{"query": p["question"], "kind": "verbatim", "source_question": p["question"]} for p in pairs]
    return [FaqSet("construction", pairs, verbatim + asked),
            FaqSet("default-offtopic", load_jsonl(DATA / "default_faq.jsonl"), offtopic)]


def stackfaq_threads(path: str | None = None) -> list[dict] | None:
    """StackFAQ's threads as {"question", "answer", "rephrasings"} from the published JSON file (``path`` or
    $KVDB_STACKFAQ), or None when no copy is named. Its quirks: an answer list may be a lone string, a rephrasing
    list holds "*" separators and once a null."""
    path = path or os.environ.get("KVDB_STACKFAQ")
    if not path:
        return None
    threads = []
    for t in json.loads(Path(path).read_text(encoding="utf-8"))["root"]["qapair"]:
        answers = [t["answer"]] if isinstance(t["answer"], str) else t["answer"]
        rephrasings = [r for r in t["rephr"] if isinstance(r, str) and r.strip() and r.strip() != "*"]
        threads.append({"question": t["question"].strip(), "answer": answers[0].strip(), "rephrasings": rephrasings})
    return threads


def hardness(query: str, question: str) -> str:
    """``hard`` when the query shares no searchable word with the stored question, ``light`` otherwise."""
    return "light" if set(terms(query)) & set(terms(question)) else "hard"


def stackfaq_sets(path: str | None = None) -> list[FaqSet]:
    threads = stackfaq_threads(path)
    if threads is None:
        return []

    def pairs(ts: list[dict]) -> list[dict]:
        return [{"domain": "webapps", "question": t["question"], "answer": t["answer"]} for t in ts]

    def asked(ts: list[dict]) -> list[dict]:
        return [{"query": r, "kind": hardness(r, t["question"]), "source_question": t["question"]}
                for t in ts for r in t["rephrasings"]]

    stored, held = threads[::2], threads[1::2]
    unanswerable = [{"query": r, "kind": "unanswerable"} for t in held for r in t["rephrasings"]]
    return [FaqSet("stackfaq", pairs(threads), asked(threads)),
            FaqSet("stackfaq-half", pairs(stored), asked(stored) + unanswerable)]


def all_sets() -> list[FaqSet]:
    return [default_set(), *construction_sets(), *stackfaq_sets()]


def folds(items: list[dict]) -> list[int]:
    """Fold 0 or 1 per query: by the pair a paraphrase asks about, alternately for unanswerable ones."""
    sources = sorted({it["source_question"] for it in items if it.get("source_question")})
    of = {q: i % 2 for i, q in enumerate(sources)}
    out, n_una = [], 0
    for it in items:
        if it.get("source_question"):
            out.append(of[it["source_question"]])
        else:
            out.append(n_una % 2)
            n_una += 1
    return out


def prepare(faq: FaqSet, home: str | None = None) -> Runtime:
    """A home holding ``faq``'s pairs with their embeddings (no base-model vectors: retrieval does not read them)."""
    rt = Runtime.open(home or tempfile.mkdtemp(prefix=f"kvdb-eval-{faq.name}-"))
    items = parse_jsonl(faq.name, "\n".join(json.dumps(p) for p in faq.pairs), None)
    add_pairs(rt.store, [validate(p, rt.config.store) for p in items], rt.config.store)
    builder = Builder(rt.config, rt.home, rt.store)
    with rt.store.read() as session:
        _, need, _ = builder.plan(session, None, False)
    for i in range(0, len(need), 64):
        chunk: list[PairText] = need[i : i + 64]
        builder._write(chunk, {}, builder._embed(chunk), False)
    return rt


def collect(retriever: Retriever, faq: FaqSet, reranker=None, rerank_candidates: int = 5) -> list[Row]:
    """Every query's candidates as the default search path finds them (Retriever.candidates, same depth)."""
    index = retriever.index()
    queries = [it["query"] for it in faq.queries]
    vectors = retriever.embedder().embed(queries)
    found = retriever.candidates(index, queries, vectors, DEPTH, None, None)
    names = retriever._pairs({p for cos, _ in found for p in cos})
    rows = []
    for item, fold, (cos, lex) in zip(faq.queries, folds(faq.queries), found):
        pmi = {}
        if reranker is not None:  # the base model's PMI of the fused top candidates
            top = [p for p, _ in retriever.fuse(cos, lex, rerank_candidates)]
            cond, null = reranker.score(item["query"], [names[p].answer for p in top])
            pmi = {names[p].question: float(c - null) for p, c in zip(top, cond)}
        rows.append(Row(faq.name, item["kind"], item.get("source_question"), fold,
                        {names[p].question: c for p, c in cos.items()},
                        {names[p].question: s for p, s in lex.items()}, pmi))
    return rows

