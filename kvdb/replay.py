"""Whole answers replayed for a token-identical prompt on the same engine: exact without running the model.

An engine whose batched passes compute every row exactly as a one-token step does (``engine.exact_batches``:
llama.cpp built without LLAMAFILE and CPU REPACK, kvdb.engines.llama_cpp) is deterministic: for one prompt its
speculative answer equals its plain greedy decoding bit for bit, every time. Such an answer is kept in the store's
``engine_answers`` table, keyed by

- ``engine_key``: the sha256 of the engine's ``describe()`` (model fingerprint, engine, build, context, batch and
  thread settings; anything that could change a logit), and
- ``prompt_key``: the sha256 of the exact prompt ids (kvdb.recorded.prompt_key),

and asking the same prompt again on that engine returns it without a single pass. An answer that finished (eos) or
was allowed at least as many tokens serves any smaller limit, cut to it: greedy decoding's first n tokens do not
depend on the limit.

The transformers engine is exact only up to floating-point ties between kernels of different shapes (kvdb.decode),
so its answers are never replayed; they are verified in long passes instead (kvdb.sources.ExactAnswerSource).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Collection, Sequence

import torch
from sqlalchemy import delete, select

from kvdb.decode import GenerationResult, result_stats
from kvdb.engines.statecache import describe_key
from kvdb.errors import CorruptError
from kvdb.recorded import prompt_key, usable_answer
from kvdb.store.blobs import pack, unpack
from kvdb.store.models import EngineAnswer

log = logging.getLogger(__name__)

KEEP = 65536  # answers kept per engine key (about 0.5 kB each at 128 tokens); the oldest go first


def engine_key(engine) -> str | None:
    """The key an engine's answers are kept under, or None where its answers may not be replayed."""
    if not getattr(engine, "exact_batches", False):
        return None
    return hashlib.sha256(describe_key(engine.describe()).encode()).hexdigest()


class ReplayBook:
    """The store's engine answers for one engine (``engine_key`` from :func:`engine_key`)."""

    def __init__(self, store, key: str):
        self.store, self.key = store, key

    def lookup(self, prompt: Sequence[int], max_new_tokens: int) -> list[int] | None:
        """The recorded answer to exactly ``prompt``, cut to ``max_new_tokens``; None if none serves that limit."""
        with self.store.read() as session:
            row = session.scalars(select(EngineAnswer).where(EngineAnswer.engine_key == self.key,
                                                             EngineAnswer.prompt_key == prompt_key(prompt))).first()
            if row is None:
                return None
            try:
                ids = unpack(row.data, row.checksum, f"engine answer {row.prompt_key[:12]}")["output_ids"].tolist()
            except (CorruptError, KeyError):
                log.warning("a recorded engine answer is damaged; answering by decoding (kvdb doctor reports it)")
                return None
            return usable_answer(ids, bool(row.finished), int(row.max_new_tokens), max_new_tokens)

    def record(self, prompt: Sequence[int], output: Sequence[int], max_new_tokens: int,
               eos_ids: Collection[int]) -> None:
        """Keep ``output`` (the engine's answer under ``max_new_tokens``) as the answer to ``prompt``, replacing an
        older one; one transaction, the oldest answers beyond ``KEEP`` dropped in it."""
        finished = bool(output) and output[-1] in set(eos_ids)
        data, digest = pack({"output_ids": torch.tensor(list(output), dtype=torch.int32)})
        key = prompt_key(prompt)
        with self.store.write() as session:
            session.execute(delete(EngineAnswer).where(EngineAnswer.engine_key == self.key,
                                                       EngineAnswer.prompt_key == key))
            session.add(EngineAnswer(engine_key=self.key, prompt_key=key, max_new_tokens=max_new_tokens,
                                     finished=finished, data=data, checksum=digest))
            session.flush()
            old = session.scalars(select(EngineAnswer.id).where(EngineAnswer.engine_key == self.key)
                                  .order_by(EngineAnswer.id.desc()).offset(KEEP).limit(1)).first()
            if old is not None:
                session.execute(delete(EngineAnswer).where(EngineAnswer.engine_key == self.key,
                                                           EngineAnswer.id <= old))


def replay(book: ReplayBook, engine_name: str, prompt: Sequence[int], max_new_tokens: int) -> GenerationResult | None:
    """The recorded answer to ``prompt`` as a generation (no pass of the model), or None where there is none."""
    t0 = time.perf_counter()
    output = book.lookup(prompt, max_new_tokens)
    if not output:
        return None
    seconds = time.perf_counter() - t0
    stats = result_stats(engine_name, seconds, seconds, len(output), 0, 0, 0, {})
    stats["replayed"] = True
    return GenerationResult(output, stats)
