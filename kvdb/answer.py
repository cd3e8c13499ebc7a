"""`kvdb query --generate`: retrieve -> prompt -> speculative decoding -> answer with stats.

The base model answers with the retrieved pairs as reference (kvdb.prompt); its output is token-identical to plain
greedy decoding. Three kinds of draft feed the verifier (kvdb.decode picks per step):
- the base model's own earlier answer to this exact prompt (recorded by `kvdb train` or by an earlier query),
- n-gram copies from the retrieved answers and from recorded answers of the retrieved pairs,
- the trained draft model attending to the retrieved pairs' stored vectors (best checkpoint by default).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvdb.decode import CopySource, DraftPolicy, ExactAnswerSource, speculative_generate
from kvdb.errors import ForeignFileError, KvdbError, ValidationError
from kvdb.lm import LM, load_model
from kvdb.prompt import Reference, prompt_ids
from kvdb.retrieve import QueryResult, Retriever
from kvdb.runtime import Runtime
from kvdb.store.pairs import normalise


@dataclass
class Answer:
    result: QueryResult
    answer: str
    prompt_ids: list[int]
    output_ids: list[int]
    stats: dict[str, Any]
    draft: str | None = None
    notices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = self.result.as_dict()
        stats = {k: self.stats[k] for k in ("seconds", "new_tokens", "verify_steps", "drafted", "accepted")}
        stats.update({k: v for k, v in self.stats.items() if k not in stats})
        out.update({"answer": self.answer, "prompt_ids": self.prompt_ids, "output_ids": self.output_ids,
                    "stats": stats, "draft": self.draft})
        return out


class Answerer:
    """Holds the loaded models for many questions (one process, `kvdb query --file ... --generate`)."""

    def __init__(self, rt: Runtime, draft_path: str | None = None, use_draft: bool = True, lm: LM | None = None):
        self.rt = rt
        self.lm = lm or load_model(rt.config.model, rt.home)
        self.retriever = Retriever(rt.config, rt.home, rt.store, lm=self.lm,
                                   model_fingerprint=self.lm.fingerprint)
        self.notices: list[str] = []
        self.draft = None
        self.draft_name: str | None = None
        if use_draft:
            self._load_draft(draft_path)

    def _load_draft(self, path: str | None) -> None:
        from kvdb.draft import best_checkpoint, load_draft

        if path is None:
            found = best_checkpoint(self.rt.home.checkpoints_dir)
            if found is None:
                self.notices.append("no trained draft in the checkpoints folder; drafting by copying only "
                                    "(run `kvdb train` to add the learned draft)")
                return
            try:
                self.draft = load_draft(found, self.lm, self.rt.config.draft)
            except (ForeignFileError, KvdbError) as exc:
                self.notices.append(f"{exc}; drafting by copying only")
                return
            self.draft_name = str(found)
            return
        if not Path(path).exists():
            raise ValidationError(f"draft checkpoint {path} does not exist")
        self.draft = load_draft(path, self.lm, self.rt.config.draft)  # an explicit --draft must load or fail
        self.draft_name = str(path)

    def _check_limits(self, ids: list[int], max_new_tokens: int) -> None:
        if not 1 <= max_new_tokens <= 4096:
            raise ValidationError(f"--max-new-tokens must be between 1 and 4096, got {max_new_tokens}")
        if len(ids) + max_new_tokens > self.lm.max_positions:
            raise ValidationError(
                f"the prompt is {len(ids)} tokens; with {max_new_tokens} new tokens it exceeds the model's context "
                f"of {self.lm.max_positions}; ask a shorter question or lower --top-k / --max-new-tokens")

    def sources(self, ids: list[int], result: QueryResult, query: str, max_new_tokens: int, book) -> list:
        from kvdb.train import AnswerRequest

        sources: list = []
        top = result.matches[0] if result.matches else None
        verbatim = top is not None and normalise(top.question).casefold() == normalise(query).casefold()
        request = AnswerRequest(prompt=ids, pair_hash=top.hash if verbatim else None)
        book.lookup([request])
        if request.output:
            sources.append(ExactAnswerSource(ids, request.output))
        copies = [self.lm.encode(m.answer) for m in result.matches]
        copies += self._recorded_answers([m.hash for m in result.matches])
        sources.append(CopySource(copies, search_context=True))  # the prompt holds the references too
        if self.draft is not None and result.matches:
            from kvdb.draft import LearnedDraftSource, load_knowledge

            knowledge = load_knowledge(self.rt.store, self.draft, [m.hash for m in result.matches])
            sources.append(LearnedDraftSource(self.draft, self.lm, knowledge))
        return sources

    def _recorded_answers(self, hashes: list[str]) -> list[list[int]]:
        from sqlalchemy import select

        from kvdb.prompt import PROMPT_FORMAT
        from kvdb.store.blobs import unpack
        from kvdb.store.models import BaseAnswer

        out = []
        with self.rt.store.read() as session:
            for row in session.scalars(select(BaseAnswer).where(
                    BaseAnswer.fingerprint == self.lm.fingerprint, BaseAnswer.prompt_format == PROMPT_FORMAT,
                    BaseAnswer.pair_hash.in_(hashes))):
                try:
                    out.append(unpack(row.data, row.checksum, "base answer")["output_ids"].tolist())
                except KvdbError:
                    continue  # a damaged recording only costs speed; kvdb doctor reports it
        return out

    def answer(self, query: str, max_new_tokens: int | None = None, top_k: int | None = None,
               domain: str | None = None, on_tokens: Callable[[list[int]], None] | None = None,
               record: bool = True) -> Answer:
        from kvdb.train import AnswerBook, AnswerRequest

        if max_new_tokens is None:
            max_new_tokens = self.rt.config.generation.max_new_tokens
        (result,) = self.retriever.search([query], top_k, domain)
        ids = prompt_ids(self.lm, query, [Reference(m.question, m.answer) for m in result.matches])
        self._check_limits(ids, max_new_tokens)
        book = AnswerBook(self.rt, self.lm, max_new_tokens, replace_stored=False)
        sources = self.sources(ids, result, query, max_new_tokens, book)
        policy = DraftPolicy(max_draft=self.rt.config.generation.max_draft_tokens)
        generated = speculative_generate(self.lm.model, ids, max_new_tokens, self.lm.eos_ids, sources, policy,
                                         on_tokens=on_tokens)
        if record and not any(isinstance(s, ExactAnswerSource) for s in sources):
            top = result.matches[0] if result.matches else None
            verbatim = top is not None and normalise(top.question).casefold() == normalise(query).casefold()
            try:
                book.record([AnswerRequest(prompt=ids, pair_hash=top.hash if verbatim else None,
                                           output=generated.output_ids)])
            except KvdbError as exc:
                self.notices.append(f"answer not recorded: {exc}")
        return Answer(result, self.lm.decode(generated.output_ids), ids, generated.output_ids, generated.stats,
                      self.draft_name)

    def flush_notices(self) -> None:
        self.retriever.flush_notices()
        for notice in self.notices:
            print(f"notice: {notice}", file=sys.stderr)
        self.notices.clear()
