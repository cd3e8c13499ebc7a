"""`kvdb query --generate`: retrieve -> prompt -> speculative decoding -> answer with stats.

The base model answers with the retrieved pairs as reference (kvdb.prompt); its output is token-identical to plain
greedy decoding. The base model runs behind an engine (kvdb.engines), one per Answerer. Three kinds of draft
feed the verifier (kvdb.policy picks per step):
- the base model's own earlier answer to this exact prompt (recorded by `kvdb train` or by an earlier query),
- n-gram copies from the retrieved answers and from recorded answers of the retrieved pairs,
- the trained draft model attending to the retrieved pairs' stored vectors (best checkpoint by default).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvdb.decode import draft_only_generate, greedy_generate, speculative_generate
from kvdb.engines import Engine, engine_name, open_engine
from kvdb.engines.statecache import PrefixReuse, StateCache
from kvdb.errors import ForeignFileError, KvdbError, NotBuiltError, ValidationError
from kvdb.lm import LM, load_model
from kvdb.passcost import PassPlan
from kvdb.policy import DraftPolicy
from kvdb.prompt import Reference, prefix_boundaries, prompt_ids
from kvdb.recorded import AnswerBook, AnswerRequest
from kvdb.replay import ReplayBook, engine_key, replay
from kvdb.retrieve import QueryResult, Retriever
from kvdb.runtime import Runtime
from kvdb.sources import COPY_PRIORS, UNSURE_COPY_PRIORS, CopySource, ExactAnswerSource
from kvdb.store.pairs import normalise

log = logging.getLogger(__name__)


@dataclass
class Answer:
    result: QueryResult
    answer: str
    prompt_ids: list[int]
    output_ids: list[int]
    stats: dict[str, Any]
    draft: str | None = None
    notices: list[str] = field(default_factory=list)
    verified: bool = True  # False: the draft's own answer (--draft-only), not checked by the base model
    baseline: dict[str, Any] | None = None  # --vs-greedy: plain greedy decoding of the same prompt
    max_new_tokens: int = 0  # the limit it was decoded under

    def compare_with_greedy(self, lm: LM, engine: Engine | None = None) -> dict[str, Any]:
        """Decode the same prompt with plain greedy decoding (``generate``, or ``engine``'s own): its time, our
        speedup, and token identity."""
        base = greedy_generate(engine or lm.model, self.prompt_ids, self.max_new_tokens or len(self.output_ids) or 1,
                               lm.eos_ids)
        seconds = base.stats["seconds"]
        self.baseline = {"seconds": seconds, "speedup": round(seconds / self.stats["seconds"], 3)
                         if self.stats["seconds"] else 0.0, "identical": base.output_ids == self.output_ids,
                         "time_to_first_token": base.stats["time_to_first_token"]}
        if not self.verified:  # a draft-only answer: keep the verified text to compare with
            self.baseline["answer"] = lm.decode(base.output_ids)
        return self.baseline

    def as_dict(self) -> dict[str, Any]:
        out = self.result.as_dict()
        stats = {k: self.stats[k] for k in ("seconds", "new_tokens", "verify_steps", "drafted", "accepted")}
        stats.update({k: v for k, v in self.stats.items() if k not in stats})
        out.update({"answer": self.answer, "prompt_ids": self.prompt_ids, "output_ids": self.output_ids,
                    "stats": stats, "draft": self.draft, "verified": self.verified})
        if self.baseline is not None:
            out["greedy_baseline"] = self.baseline
        return out


class StoreKnowledge:
    """Retrieval, recorded answers and pair vectors from the store (the default; `--cache` uses kvdb.deployed)."""

    def __init__(self, rt: Runtime, lm: LM):
        self.rt, self.lm = rt, lm
        self._book = None
        self.retriever = Retriever(rt.config, rt.home, rt.store, lm=lm, model_fingerprint=lm.fingerprint)

    def recorded_answers(self, hashes: list[str]) -> list[list[int]]:
        """The base model's recorded answers to the pairs ``hashes`` (under whatever references they had), and
        its answers to their rephrasings: training's variants and queries retrieval was sure of."""
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
        if self._book is None:
            self._book = self.answer_book(self.rt.config.generation.max_new_tokens)
        return out + self._book.answers_about(hashes)

    def pair_knowledge(self, draft, hashes: list[str]):
        from kvdb.draft import load_knowledge

        return load_knowledge(self.rt.store, draft, hashes)

    def answer_book(self, max_new_tokens: int):
        """Where answers to exact prompts are looked up and recorded."""
        return AnswerBook(self.rt, self.lm, max_new_tokens, replace_stored=False)

    def replay_book(self, engine: Engine) -> ReplayBook | None:
        """Where ``engine``'s whole answers are replayed from; None where its answers may not be (kvdb.replay)."""
        key = engine_key(engine)
        return ReplayBook(self.rt.store, key) if key is not None else None


class Answerer:
    """Holds the loaded models for many questions (one process, `kvdb query --file ... --generate`).

    ``cache``: answer from an exported knowledge cache alone (retrieval and vectors from the file; nothing is read
    from or written to the store)."""

    def __init__(self, rt: Runtime, draft_path: str | None = None, use_draft: bool = True, lm: LM | None = None,
                 cache: str | None = None):
        self.rt = rt
        self.lm = lm or load_model(rt.config.model, rt.home)
        if cache is not None:
            from kvdb.deployed import CacheKnowledge

            self.knowledge = CacheKnowledge(rt.config, rt.home, cache, self.lm)
        else:
            self.knowledge = StoreKnowledge(rt, self.lm)
        self.from_cache = cache is not None
        self.retriever = self.knowledge.retriever
        self.notices: list[str] = []
        self._pass_plans: dict[str, PassPlan | None] = {}
        self._engines: dict[str, Engine] = {}
        self.engine_name = engine_name(rt.config.model.engine, self.lm)
        self._states = None
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
        limit = min(self.lm.max_positions, self.engine.max_positions)
        if len(ids) + max_new_tokens > limit:
            raise ValidationError(
                f"the prompt is {len(ids)} tokens; with {max_new_tokens} new tokens it exceeds the model's context "
                f"of {limit}; ask a shorter question or lower --top-k / --max-new-tokens")

    def sources(self, ids: list[int], result: QueryResult, query: str, book, learned: bool = True) -> list:
        """The draft sources for one prompt: a recorded answer to it, copies, and the learned draft (``learned``)."""
        sources: list = []
        if book is not None:
            request = AnswerRequest(prompt=ids, pair_hash=self._own_pair(result, query))
            book.lookup([request])
            if request.output:
                sources.append(ExactAnswerSource(ids, request.output))
        hashes = [m.hash for m in result.matches]
        copies = [self.lm.encode(m.answer) for m in result.matches] + self.knowledge.recorded_answers(hashes)
        # The prompt holds the references too (search_context); copies from references retrieval was not sure of
        # start from lower priors.
        sources.append(CopySource(copies, search_context=True,
                                  priors=COPY_PRIORS if result.confident else UNSURE_COPY_PRIORS))
        if learned and self.draft is not None and result.matches:
            sources.append(self.learned_source(result))
        return sources

    def learned_source(self, result: QueryResult):
        from kvdb.draft import LearnedDraftSource

        return LearnedDraftSource(self.draft, self.lm,
                                  self.knowledge.pair_knowledge(self.draft, [m.hash for m in result.matches]))

    @staticmethod
    def _own_pair(result: QueryResult, query: str) -> str | None:
        """The top pair's hash when the query is that pair's own question (its answer is kept in the store)."""
        top = result.matches[0] if result.matches else None
        verbatim = top is not None and normalise(top.question).casefold() == normalise(query).casefold()
        return top.hash if verbatim else None

    def prepare(self, query: str, max_new_tokens: int | None = None, top_k: int | None = None,
                domain: str | None = None) -> tuple[QueryResult, list[int], int]:
        """Retrieve and build the prompt: (result, prompt ids, max_new_tokens), limits checked."""
        if max_new_tokens is None:
            max_new_tokens = self.rt.config.generation.max_new_tokens
        (result,) = self.retriever.search([query], top_k, domain)
        ids = prompt_ids(self.lm, query, [Reference(m.question, m.answer) for m in result.matches])
        self._check_limits(ids, max_new_tokens)
        return result, ids, max_new_tokens

    def answer(self, query: str, max_new_tokens: int | None = None, top_k: int | None = None,
               domain: str | None = None, on_tokens: Callable[[list[int]], None] | None = None,
               record: bool = True, learned: bool = True) -> Answer:
        """Retrieve, build the prompt and answer it: this engine's own earlier answer to the very same prompt where
        it may be replayed (kvdb.replay), else speculative decoding; the answer is recorded (``record``)."""
        result, ids, max_new_tokens = self.prepare(query, max_new_tokens, top_k, domain)
        engine = self.engine
        replays = self.knowledge.replay_book(engine)
        generated = replay(replays, engine.name, ids, max_new_tokens) if replays is not None else None
        if generated is not None:
            if on_tokens is not None:
                on_tokens(list(generated.output_ids))
        else:
            book = self.knowledge.answer_book(max_new_tokens)
            sources = self.sources(ids, result, query, book, learned)
            generated = speculative_generate(engine, ids, max_new_tokens, self.lm.eos_ids, sources,
                                             self.policy(engine), on_tokens=on_tokens,
                                             reuse=self.reuse(engine, query, result, ids))
            self.notices += generated.stats["notices"]
            if record:
                self._record(book, replays, sources, result, query, ids, generated.output_ids, max_new_tokens)
        return Answer(result, self.lm.decode(generated.output_ids), ids, generated.output_ids, generated.stats,
                      self.draft_name if learned else None, max_new_tokens=max_new_tokens)

    def _record(self, book, replays: ReplayBook | None, sources: list, result: QueryResult, query: str,
                ids: list[int], output: list[int], max_new_tokens: int) -> None:
        """Keep a decoded answer: for replay on this engine, and as the recorded answer every engine drafts from."""
        try:
            if replays is not None:
                replays.record(ids, output, max_new_tokens, self.lm.eos_ids)
            if self._worth_recording(sources, output, replaces=replays is None):
                # An answer to a rephrasing that retrieval is sure of is the model's wording about that pair:
                # later rephrasings copy from it, as from training's answers to the pair's variants.
                about = result.matches[0].hash if result.confident and result.matches else None
                book.record([AnswerRequest(prompt=ids, pair_hash=self._own_pair(result, query), output=output,
                                           about=about)])
        except KvdbError as exc:
            self.notices.append(f"answer not recorded: {exc}")

    @staticmethod
    def _worth_recording(sources: list, output: list[int], replaces: bool = True) -> bool:
        """Whether to keep ``output`` as the recorded answer to its prompt: when there was none, or (``replaces``)
        when the one it was verified against parts from it (recorded by another engine, whose greedy answer can
        differ in the last bits; the next ask on this engine is then verified in one pass). An engine that replays
        its own answers passes ``replaces=False``: it never needs the shared recording, which stays the one the
        other engine verifies from in one pass and the draft is trained on."""
        exact = next((s for s in sources if isinstance(s, ExactAnswerSource)), None)
        if exact is None:
            return True
        n = min(len(exact.answer_ids), len(output))
        return replaces and exact.answer_ids[:n] != output[:n]

    def answer_draft_only(self, query: str, max_new_tokens: int | None = None, top_k: int | None = None,
                          domain: str | None = None,
                          on_tokens: Callable[[list[int]], None] | None = None) -> Answer:
        """The learned draft answers alone: its greedy tokens, never checked by the base model (``verified`` false)."""
        if self.draft is None:
            raise NotBuiltError("--draft-only needs a trained draft: run `kvdb train`, or pass --draft CKPT")
        result, ids, max_new_tokens = self.prepare(query, max_new_tokens, top_k, domain)
        generated = draft_only_generate(self.learned_source(result), ids, max_new_tokens, self.lm.eos_ids,
                                        on_tokens=on_tokens)
        answer = Answer(result, self.lm.decode(generated.output_ids), ids, generated.output_ids, generated.stats,
                        self.draft_name, max_new_tokens=max_new_tokens)
        answer.verified = False
        return answer

    @property
    def engine(self) -> Engine:
        """The engine that runs the base model for every answer of this Answerer (model.engine, KVDB_ENGINE)."""
        return self.engine_for(self.engine_name)

    def engine_for(self, name: str) -> Engine:
        """The engine ``name`` ("transformers" or "llama_cpp") on this Answerer's model, opened once."""
        if name not in self._engines:
            self._engines[name] = open_engine(name, self.lm, self.rt.config.model.threads)
        return self._engines[name]

    def reuse(self, engine: Engine, query: str, result: QueryResult, ids: list[int]) -> PrefixReuse | None:
        """Prefix-state reuse for one prompt on ``engine``: None where the engine cannot save its state or
        prefix_states is off."""
        cfg = self.rt.config.prefix_states
        if not cfg.enabled or not callable(getattr(engine, "save_state", None)):
            return None
        if self._states is None:
            # Written to disk by a writer thread: an answer never waits for its states' files.
            self._states = StateCache(self.rt.home.models_dir / "states", memory_bytes=cfg.memory_mb << 20,
                                      disk_bytes=cfg.disk_mb << 20, background_writes=True)
        refs = [Reference(m.question, m.answer) for m in result.matches]
        return PrefixReuse(self._states, prefix_boundaries(self.lm, query, refs, ids),
                           save_whole=engine_key(engine) is None)

    def policy(self, engine: Engine | None = None) -> DraftPolicy:
        """A fresh draft policy for one answer, with this machine's measured pass costs on ``engine`` (default:
        this Answerer's)."""
        plan = self.pass_plan(engine)
        return DraftPolicy(max_draft=self.rt.config.generation.max_draft_tokens,
                           pass_costs=plan.costs if plan else None)

    def pass_costs(self) -> list[float] | None:
        """The pass-cost table of ``pass_plan`` alone (what the copy-ceiling benchmarks price passes with)."""
        plan = self.pass_plan()
        return plan.costs if plan else None

    def pass_plan(self, engine: Engine | None = None) -> PassPlan | None:
        """Cost of a verify pass by length on ``engine`` (default: this Answerer's) and the kernel for each,
        measured once per model, engine, device, dtype and thread count and kept under KVDB_HOME/models (17-30 s on
        2 CPU cores); None where it cannot be measured."""
        engine = engine or self.engine
        if engine.name not in self._pass_plans:
            import json

            import torch

            from kvdb.fileio import atomic_write_bytes
            from kvdb.passcost import measure_pass_plan

            lm = self.lm
            key = (f"{lm.fingerprint[:16]}-{engine.name}-{lm.device.type}"
                   f"-{str(lm.dtype).replace('torch.', '')}-t{getattr(engine, 'n_threads', torch.get_num_threads())}")
            path = self.rt.home.models_dir / "pass_costs" / f"{key}.json"
            try:
                saved = json.loads(path.read_text())
                costs, rows = saved["pass_costs"], saved["transposed_rows"]  # files before the kernel choice: again
                if not (isinstance(costs, list) and costs and all(isinstance(c, (int, float)) for c in costs)
                        and isinstance(rows, list) and all(isinstance(r, int) for r in rows)):
                    raise ValueError("malformed")
                plan = PassPlan([float(c) for c in costs], frozenset(rows))
            except (OSError, ValueError, KeyError, TypeError):
                self.notices.append("measuring this machine's verify-pass costs (once; kept under "
                                    f"{path.parent})")
                plan = measure_pass_plan(engine, max_q=self.rt.config.generation.max_draft_tokens + 9)
                try:
                    atomic_write_bytes(path, json.dumps({"key": key, "pass_costs": plan.costs,
                                                         "transposed_rows": sorted(plan.transposed_rows)}).encode())
                except OSError:
                    pass  # a read-only home: measured again next time
            self._pass_plans[engine.name] = plan
            if hasattr(engine, "transposed_rows"):
                engine.transposed_rows = plan.transposed_rows  # the kernel measured fastest per pass length
        return self._pass_plans[engine.name]

    def warm_up(self) -> None:
        """A few untimed passes of each decoding path (the first passes of a process allocate and pick kernels)."""
        ids = self.lm.chat_ids([{"role": "user", "content": "Hello?"}], add_generation_prompt=True)
        greedy_generate(self.engine, ids, 4, self.lm.eos_ids)
        speculative_generate(self.engine, ids, 4, self.lm.eos_ids, [CopySource([ids], search_context=True)])

    def close(self) -> None:
        """Wait for the prefix-state files still being written (the answers do not wait for them)."""
        if self._states is not None:
            self._states.flush()

    def flush_notices(self) -> None:
        self.retriever.flush_notices()
        for notice in self.notices:
            log.warning(notice)
        self.notices.clear()
