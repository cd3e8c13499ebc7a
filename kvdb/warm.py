"""Answer every stored question once on the answering engine, so that asking it later costs no model pass.

Each stored question is answered exactly as `kvdb query --generate "question"` answers it (same retrieval, same
prompt, same engine): an engine that may replay (kvdb.replay) records its answer for that prompt, and an engine that
keeps prefix states (kvdb.engines.statecache) saves the states of the prompt's recurring prefixes (the instruction,
the top pair's reference block, the system turn) as answering always does. A question whose answer is already
recorded is replayed, which costs a lookup, so running this again after adding pairs answers only what changed
(adding a pair can change other questions' references, and so their prompts).

`kvdb train` runs it after training (``training.warm_answers``); `kvdb build --states` runs it after building.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from kvdb.errors import KvdbError
from kvdb.replay import engine_key
from kvdb.store.pairs import list_pairs

log = logging.getLogger(__name__)

_NOTHING = "the {} engine neither replays answers nor keeps prefix states here; nothing to prepare"


def stored_questions(store, domain: str | None = None) -> list[str]:
    """Every stored pair's question (of ``domain``, or all), in the store's order."""
    with store.read() as session:
        return [p.question for p in list_pairs(session, domain)]


def warm_answers(runtime, lm=None, domain: str | None = None, progress: bool = False, answerer=None,
                 lock=None) -> dict[str, Any]:
    """Answer each stored question on the answering engine (model.engine / KVDB_ENGINE); returns what was done:
    ``{"engine", "questions", "answered", "replayed", "failed", "seconds"}``, or ``{"engine", "skipped"}`` where the
    engine neither replays nor keeps states. ``answerer``: a loaded kvdb.answer.Answerer to answer with, held under
    ``lock`` one question at a time (a KnowledgeBase's model lock)."""
    from kvdb.answer import Answerer
    from kvdb.engines import engine_name
    from kvdb.lm import load_model

    t0 = time.perf_counter()
    own = answerer is None
    if own:
        lm = lm or load_model(runtime.config.model, runtime.home)
        name = engine_name(runtime.config.model.engine, lm)
        if name == "transformers":  # verified in long passes from training's recordings: nothing to prepare
            return {"engine": name, "skipped": _NOTHING.format(name)}
        answerer = Answerer(runtime, use_draft=True, lm=lm)
    engine = answerer.engine
    keeps_states = runtime.config.prefix_states.enabled and callable(getattr(engine, "save_state", None))
    if engine_key(engine) is None and not keeps_states:
        return {"engine": engine.name, "skipped": _NOTHING.format(engine.name)}
    questions = stored_questions(runtime.store, domain)
    counts = {"answered": 0, "replayed": 0, "failed": 0}
    bar = _bar(len(questions), progress)
    for question in questions:
        try:
            with lock or contextlib.nullcontext():
                answer = answerer.answer(question)
        except KvdbError as exc:  # e.g. a question whose prompt exceeds the context: it is answered by decoding
            log.warning("not prepared: %r (%s)", question[:60], exc)
            counts["failed"] += 1
        else:
            counts["replayed" if answer.stats.get("replayed") else "answered"] += 1
        bar.update(1)
    bar.close()
    answerer.close()  # the prefix states reach the disk before training or the build reports
    if own:  # a caller's answerer's notices are for its owner to report
        answerer.flush_notices()
    return {"engine": engine.name, "questions": len(questions), **counts,
            "seconds": round(time.perf_counter() - t0, 2)}


def _bar(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="answering stored questions", unit="q", disable=not show, leave=False)
