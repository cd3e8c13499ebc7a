"""The Python API: ``kvdb.open()`` -> ``KnowledgeBase``, the library that `kvdb` (the CLI) and `kvdb serve` are thin
layers over.

    import kvdb
    with kvdb.open(home="var") as kb:
        h = kb.add("What is a B-tree?", "A balanced search tree ...", domain="cs")
        kb.build()
        r = kb.query("How do B-trees stay balanced?", top_k=3)      # r.to_dict() == `kvdb query --json`
        a = kb.answer("How do B-trees stay balanced?")                # a.to_dict() == `kvdb query --generate --json`
        for piece in kb.answer_stream("How do B-trees stay balanced?"):
            print(piece, end="")

A ``KnowledgeBase`` loads the base model, the embedder, the index and the draft lazily, once, and reuses them for
every later call. It is safe to share between threads: the base model runs one answer at a time (an answer's
tokens never depend on what else is running), pair reads and writes and retrieval without the base model run
beside it, and one build runs at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvdb.errors import AnswerCancelled, ConflictError, ValidationError
from kvdb.runtime import Runtime
from kvdb.store.pairs import AddReport, PairInput

if TYPE_CHECKING:  # imported where used: retrieval and answering pull in torch, which pair commands never need
    from kvdb.answer import Answer, Answerer
    from kvdb.calibrate import CalibrationReport, Labelled
    from kvdb.lm import LM
    from kvdb.retrieve import Match, QueryResult, Retriever

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    """The pairs that best answer a query; ``to_dict()`` is `kvdb query --json`. ``raw`` is the retriever's result."""

    raw: QueryResult

    @property
    def query(self) -> str:
        return self.raw.query

    @property
    def confident(self) -> bool:
        return self.raw.confident

    @property
    def matches(self) -> list[Match]:
        return self.raw.matches

    def to_dict(self) -> dict[str, Any]:
        return self.raw.as_dict()


@dataclass(frozen=True)
class AnswerResult:
    """One generated answer; ``to_dict()`` is `kvdb query --generate --json`. ``raw`` is the library's Answer."""

    raw: Answer

    @property
    def text(self) -> str:
        return self.raw.answer

    @property
    def output_ids(self) -> list[int]:
        return self.raw.output_ids

    @property
    def prompt_ids(self) -> list[int]:
        return self.raw.prompt_ids

    @property
    def stats(self) -> dict[str, Any]:
        return self.raw.stats

    @property
    def matches(self) -> list[Match]:
        return self.raw.result.matches

    @property
    def confident(self) -> bool:
        return self.raw.result.confident

    def to_dict(self) -> dict[str, Any]:
        return self.raw.as_dict()


class TextPieces:
    """Verified token ids -> new text pieces. The whole answer is decoded each time (multi-byte characters and
    tokenizer spacing come out right) and a piece is released only while the text so far ends in a whole
    character; ``finish`` releases the rest, so the pieces join to exactly the answer's text."""

    def __init__(self, lm):
        self.lm, self.ids, self.shown = lm, [], ""

    def feed(self, tokens: list[int]) -> str:
        self.ids += tokens
        text = self.lm.decode(self.ids)
        if not text.startswith(self.shown) or text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def finish(self, text: str) -> str:
        piece = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return piece


def _scope(domain: str | None) -> str | None:
    """``None`` and ``"all"`` mean every domain."""
    return None if domain in (None, "all") else domain


def _record_pair(record: Any, domain: str | None, where: str) -> PairInput:
    """One record of ``add_many``: a PairInput, or a dict read exactly like a line of `kvdb add --file`."""
    from kvdb.store.ingest import _from_record  # the one reading of a record, shared with JSONL and CSV files

    if isinstance(record, PairInput):
        return record
    if not isinstance(record, dict):
        raise ValidationError(f"{where}: must be a dict with question and answer (got {type(record).__name__})")
    return _from_record(record, domain, where)


class KnowledgeBase:
    """A home (store, index, caches, checkpoints) with its models, loaded on first use and kept.

    ``draft``: a draft checkpoint (default: the best one in the home); ``use_draft=False`` drafts by copying only;
    ``cache``: retrieve and answer from an exported knowledge_cache.pth alone (the store is not opened);
    ``on_notice``: called with each notice (an index rebuilt, no trained draft, ...) [logged as a warning]."""

    def __init__(self, runtime: Runtime, draft: str | os.PathLike | None = None, use_draft: bool = True,
                 cache: str | os.PathLike | None = None, on_notice: Callable[[str], None] | None = None):
        self.rt = runtime
        self.on_notice = on_notice or log.warning
        self._draft, self._use_draft = (str(draft) if draft is not None else None), use_draft
        self._cache = str(cache) if cache is not None else None
        self._lm = None
        self._answerer = None
        self._retriever: Retriever | None = None
        self._load_lock = threading.RLock()  # lazy loading happens once, whichever thread asks first
        self.model_lock = threading.Lock()  # the base model runs one answer (or re-ranking) at a time
        self._search_lock = threading.Lock()  # the query embedder and its tokenizer serve one caller at a time
        self._build_lock = threading.Lock()

    # -- lifetime --------------------------------------------------------------------------------------------------
    def __enter__(self) -> "KnowledgeBase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finish pending writes (prefix-state files) and release the store's connections (models are freed with
        the object)."""
        if self._answerer is not None:
            self._answerer.close()
        if "store" in vars(self.rt):
            self.rt.store.dispose()

    @property
    def home(self):
        return self.rt.home

    @property
    def config(self):
        return self.rt.config

    # -- models, loaded once -------------------------------------------------------------------------------------
    def lm(self) -> LM:
        """The base model and tokenizer."""
        with self._load_lock:
            if self._lm is None:
                from kvdb.lm import load_model

                self._lm = load_model(self.rt.config.model, self.rt.home)
            return self._lm

    def answerer(self) -> Answerer:
        """The loaded kvdb.answer.Answerer (base model, retrieval, draft) behind ``answer``."""
        with self._load_lock:
            if self._answerer is None:
                from kvdb.answer import Answerer

                self._answerer = Answerer(self.rt, draft_path=self._draft, use_draft=self._use_draft, lm=self.lm(),
                                          cache=self._cache)
            return self._answerer

    def retriever(self) -> Retriever:
        """The retriever behind ``query``: its own embedder, so retrieval runs beside an answer being generated."""
        with self._load_lock:
            if self._retriever is None:
                from kvdb.retrieve import Retriever

                lm = self.lm() if self.rt.config.index.rerank else None  # re-ranking reads the base model
                fingerprint = lm.fingerprint if lm is not None else None
                if self._cache is not None:
                    from kvdb.deployed import CacheRetriever
                    from kvdb.export import load_cache

                    self._retriever = CacheRetriever(self.rt.config, self.rt.home, load_cache(self._cache),
                                                     self._cache, lm=lm)
                else:
                    self._retriever = Retriever(self.rt.config, self.rt.home, self.rt.store, lm=lm,
                                                model_fingerprint=fingerprint)
            return self._retriever

    def warm(self) -> None:
        """Load every model now and take the first slow passes (the server's start-up), so that the first question
        loads and measures nothing."""
        answerer = self.answerer()
        with self.model_lock:
            answerer.pass_plan()  # the verify-pass costs, measured once per machine and kept under the home
            answerer.warm_up()
        for retriever in (answerer.retriever, self.retriever()):
            retriever.embedder()
            retriever.index()
            if retriever.rerank:
                retriever.reranker()
        self.flush_notices()

    def flush_notices(self) -> None:
        """Hand the notices gathered by the models since the last call to ``on_notice``."""
        sources = []
        if self._retriever is not None:
            sources.append(self._retriever.notices)
        if self._answerer is not None:
            sources += [self._answerer.retriever.notices, self._answerer.notices]
        for notices in sources:
            pending = list(notices)
            notices.clear()
            for notice in pending:
                self.on_notice(notice)

    # -- pairs -----------------------------------------------------------------------------------------------------
    def add(self, question: str, answer: str, domain: str, metadata: dict[str, Any] | None = None,
            replace: bool = False) -> str:
        """Add one pair; returns its hash (an identical pair already stored is skipped)."""
        if metadata is not None and not isinstance(metadata, dict):
            raise ValidationError("metadata must be a dict")
        item = PairInput(domain=domain, question=question, answer=answer, metadata=dict(metadata or {}))
        return self.add_pairs([item], replace=replace).hashes[0]

    def add_many(self, records: Iterable[dict[str, Any] | PairInput], domain: str | None = None,
                 replace: bool = False) -> AddReport:
        """Add pairs all or nothing, each record read like a line of `kvdb add --file` (question, answer, optional
        domain, other fields kept as metadata); ``domain`` is the default for records without one."""
        if isinstance(records, (str, bytes, dict)):
            raise ValidationError("add_many takes a list of records (dicts with question and answer)")
        items = [_record_pair(r, domain, f"record {i}") for i, r in enumerate(records, 1)]
        if not items:
            raise ValidationError("no pairs given")
        return self.add_pairs(items, replace=replace)

    def add_pairs(self, items: list[PairInput], replace: bool = False) -> AddReport:
        from kvdb.store.pairs import add_pairs

        return add_pairs(self.rt.store, items, self.rt.config.store, replace=replace)

    def remove(self, *hashes: str, domain: str | None = None) -> list[str]:
        """Remove pairs by hash (unique prefixes do) or a whole domain; all or nothing. Returns the removed hashes."""
        from kvdb.store.pairs import remove_domain, remove_pairs

        if bool(hashes) == bool(domain):
            raise ValidationError("give one or more hashes, or a domain, but not both")
        return remove_domain(self.rt.store, domain) if domain else remove_pairs(self.rt.store, hashes)

    def list(self, domain: str | None = None) -> list[dict[str, Any]]:
        """Every pair (of ``domain``), as `kvdb list --json` prints them."""
        from kvdb.store.pairs import list_pairs, pair_dict

        with self.rt.store.read() as session:
            return [pair_dict(p) for p in list_pairs(session, domain)]

    def get(self, hash_prefix: str) -> dict[str, Any]:
        """One pair by its hash (a unique prefix is enough)."""
        from kvdb.store.pairs import find_pair, pair_dict

        with self.rt.store.read() as session:
            return pair_dict(find_pair(session, hash_prefix))

    def domains(self) -> list[dict[str, Any]]:
        from kvdb.store.pairs import domain_counts

        with self.rt.store.read() as session:
            return domain_counts(session)

    # -- build and export ------------------------------------------------------------------------------------------
    def build(self, domain: str | None = "all", batch_size: int | None = None, rebuild: bool = False,
              progress: bool = False, wait: bool = True, states: bool = False) -> dict[str, Any]:
        """Prefill pairs without vectors for the current model, embed them, refresh the index (`kvdb build --json`).
        Queries keep being answered from what is built meanwhile; ``wait=False`` refuses when a build is running.
        ``states``: then answer every stored question once (`kvdb build --states`, kvdb.warm), one at a time
        between other answers."""
        if not self._build_lock.acquire(blocking=wait):
            raise ConflictError("a build is already running; wait for it to finish")
        try:
            result = self._build(_scope(domain), batch_size, rebuild, progress)
            if states:
                from kvdb.warm import warm_answers

                result["warmed"] = warm_answers(self.rt, domain=_scope(domain), progress=progress,
                                                answerer=self.answerer(), lock=self.model_lock)
                self.flush_notices()
            return result
        finally:
            self._build_lock.release()

    def _build(self, domain: str | None, batch_size: int | None, rebuild: bool, progress: bool) -> dict[str, Any]:
        if not rebuild:
            from kvdb.uptodate import nothing_to_build

            result = nothing_to_build(self.rt, domain)  # store queries only: no model is loaded
            if result is not None:
                return result
        from kvdb.build import Builder
        from kvdb.retrieve import Retriever

        builder = Builder(self.rt.config, self.rt.home, self.rt.store)
        report = builder.run(domain=domain, batch_size=batch_size, rebuild=rebuild, progress=progress)
        index = Retriever(self.rt.config, self.rt.home, self.rt.store, embedder=builder._embedder,
                          model_fingerprint=builder.model_ref.fingerprint).index()
        return {**report.as_dict(), "indexed_pairs": index.meta.get("pairs", 0)}

    def export(self, out: str | os.PathLike | None = None, domain: str = "all") -> list[dict[str, Any]]:
        """Write knowledge_cache.pth and knowledge_cache_<domain>.pth into ``out`` [home/knowledge_cache]."""
        from kvdb.export import export_caches

        files = export_caches(self.rt.config, self.rt.home, self.rt.store, domain=domain, out=out)
        return [dict(f.__dict__) for f in files]

    # -- retrieval and answers -------------------------------------------------------------------------------------
    def query(self, question: str, top_k: int | None = None, domain: str | None = None,
              min_score: float | None = None) -> SearchResult:
        """The pairs that best answer ``question`` (`kvdb query --json`); ``confident`` when the calibrated
        probability that the store answers it reaches ``min_score`` [config index.min_confidence] (a best-score
        threshold instead where index.confident_threshold_no_rerank is set, or confident_threshold with the re-rank)."""
        return self.query_many([question], top_k, domain, min_score)[0]

    def query_many(self, questions: list[str], top_k: int | None = None, domain: str | None = None,
                   min_score: float | None = None) -> list[SearchResult]:
        if isinstance(questions, str):
            raise ValidationError("query_many takes a list of questions")
        retriever = self.retriever()
        with self._search_lock, (self.model_lock if retriever.rerank else contextlib.nullcontext()):  # re-ranking runs the model
            results = retriever.search(list(questions), top_k, _scope(domain), min_score)
        self.flush_notices()
        return [SearchResult(r) for r in results]

    def calibrate(self, items: Iterable[dict[str, Any] | Labelled], target: float = 0.05,
                  domain: str | None = None) -> CalibrationReport:
        """The lowest ``index.min_confidence`` at which at most ``target`` of this store's unanswerable questions are
        called confident, from labelled questions (`kvdb calibrate`): ``{"query", "question"}`` (or ``"hash"``) for a
        question the store answers, ``{"query", "answerable": false}`` for one it does not (or kvdb.calibrate's
        ``Labelled``). Nothing is changed: set the point in the config or pass it as ``min_score``."""
        from kvdb.calibrate import Labelled, parse, report

        items = list(items)
        labelled = items if items and all(isinstance(item, Labelled) for item in items) else \
            parse((f"question {i}", item) for i, item in enumerate(items, 1))
        calibrator, current = self.retriever().confidence_rule(None)
        if calibrator is None:
            raise ValidationError("calibrating moves the calibrated confident, which this config replaces by a score "
                                  "threshold (index.rerank or index.confident_threshold_no_rerank)")
        results = [r.raw for r in self.query_many([item.query for item in labelled], 1, domain)]
        return report(labelled, results, target, current)

    def answer(self, question: str, max_new_tokens: int | None = None, top_k: int | None = None,
               domain: str | None = None, on_text: Callable[[str], None] | None = None,
               stop: threading.Event | None = None, draft_only: bool = False) -> AnswerResult:
        """Answer ``question`` from its best pairs, token for token what the base model's greedy decoding says.

        ``on_text`` receives the text as it is verified (pieces join to ``.text``); setting ``stop`` ends the answer
        at the next verify step with AnswerCancelled. ``draft_only``: the learned draft answers alone, UNVERIFIED."""
        answerer = self.answerer()
        pieces = TextPieces(answerer.lm) if on_text is not None else None

        def on_tokens(tokens: list[int]) -> None:
            if stop is not None and stop.is_set():
                raise AnswerCancelled("the answer was stopped before it finished")
            if pieces is not None:
                piece = pieces.feed(tokens)
                if piece:
                    on_text(piece)

        with self.model_lock:
            if stop is not None and stop.is_set():
                raise AnswerCancelled("the answer was stopped before it started")
            run = answerer.answer_draft_only if draft_only else answerer.answer
            raw = run(question, max_new_tokens, top_k, _scope(domain), on_tokens=on_tokens)
        if pieces is not None:
            rest = pieces.finish(raw.answer)
            if rest:
                on_text(rest)
        self.flush_notices()
        return AnswerResult(raw)

    def answer_stream(self, question: str, max_new_tokens: int | None = None, top_k: int | None = None,
                      domain: str | None = None) -> Iterator[str]:
        """Text pieces of the answer as they are verified; they join to ``answer(question).text``. Closing the
        iterator early stops the decoding at its next verify step."""
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                self.answer(question, max_new_tokens, top_k, domain, on_text=pieces.put, stop=stop)
                pieces.put(done)
            except BaseException as exc:  # handed to the consumer, who raises it
                pieces.put(exc)

        worker = threading.Thread(target=work, name="kvdb-answer", daemon=True)
        worker.start()
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join()


def open(home: str | os.PathLike | None = None, config: str | os.PathLike | None = None, **options) -> KnowledgeBase:
    """Open the knowledge base in ``home`` (env KVDB_HOME, default ./var) with ``config`` (env KVDB_CONFIG, default
    configs/default.yaml): the CLI's defaults. ``options``: draft, use_draft, cache (see KnowledgeBase)."""
    return KnowledgeBase(Runtime.open(home, config), **options)
