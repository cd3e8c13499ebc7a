"""`kvdb bench`: answer speed of every decoding method on the same prompts, in one run, against plain greedy.

Methods (all greedy, so every output should equal its engine's baseline):
  greedy                  transformers: model.generate(do_sample=False), the transformers baseline
  hf_prompt_lookup        transformers: model.generate(prompt_lookup_num_tokens=10)
  hf_early_exit           transformers: model.generate(assistant_early_exit=N), Hugging Face's untrained N-layer
                          early-exit draft, N the draft's depth (draft.num_sampled_layers)
  kvdb_copy               kvdb on transformers, copying only (recorded answers, retrieved answers, the context)
  kvdb_draft              kvdb on transformers, copying and the trained draft (skipped when there is none)
  llamacpp_greedy         llama.cpp on the same GGUF: the prompt in one pass, then one token per pass (the baseline
                          a CPU user has)
  llamacpp_prompt_lookup  llama.cpp's own prompt-lookup speculation (LlamaPromptLookupDecoding, 10 tokens)
  kvdb_llamacpp           kvdb on llama.cpp as `kvdb query --generate` answers: for a stored question, the engine's
                          own recorded answer to the very prompt where there is one (kvdb.replay; `kvdb train`
                          records every stored question's; the other workloads stand for first asks), else
                          decoding with prefix-state reuse: the states of the prompt's recurring prefixes
                          (instruction, top pair's reference block, system turn) are restored, as after earlier
                          questions; a stored question's whole prompt too, as after an earlier ask of it
  kvdb_llamacpp_nostates  kvdb on llama.cpp decoding every answer, every prompt prefilled from scratch (no replay,
                          no states)
The llama.cpp methods need llama-cpp-python and a GGUF model source; elsewhere they are skipped with a notice.
Workloads: stored questions asked verbatim, paraphrased questions (never trained on), questions the store cannot
answer. The prompt of a question is built once (retrieval + chat template) and given to every method; nothing is
written to the store. Per method and workload: tokens/s, speedup over each baseline (median of per-question
ratios), accepted draft tokens per verify step, outputs identical to the method's own engine's greedy output, time
to first token relative to that baseline.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kvdb.errors import ValidationError

WORKLOADS = ("stored", "paraphrased", "unanswerable")
TRANSFORMERS_METHODS = ("greedy", "hf_prompt_lookup", "hf_early_exit", "kvdb_copy", "kvdb_draft")
LLAMACPP_METHODS = ("llamacpp_greedy", "llamacpp_prompt_lookup", "kvdb_llamacpp", "kvdb_llamacpp_nostates")
METHODS = TRANSFORMERS_METHODS + LLAMACPP_METHODS


def baseline_of(method: str) -> str:
    """The plain greedy decoding on the engine ``method`` runs on: what its output must equal."""
    return "llamacpp_greedy" if method in LLAMACPP_METHODS else "greedy"


@dataclass(frozen=True)
class BenchQuestion:
    query: str
    workload: str


def read_questions(path: str | Path) -> list[BenchQuestion]:
    """JSONL with ``query`` (or ``question``) and ``workload`` (stored | paraphrased | unanswerable) per line."""
    from kvdb.store.ingest import read_jsonl_objects

    name, rows = read_jsonl_objects(str(path))
    out = []
    for lineno, obj in rows:
        query = obj.get("query", obj.get("question")) if isinstance(obj, dict) else None
        workload = obj.get("workload") if isinstance(obj, dict) else None
        if not isinstance(query, str) or not query.strip():
            raise ValidationError(f"{name}:{lineno}: needs a non-empty 'query' field")
        if workload not in WORKLOADS:
            raise ValidationError(f"{name}:{lineno}: 'workload' must be one of {', '.join(WORKLOADS)}")
        out.append(BenchQuestion(query, workload))
    if not out:
        raise ValidationError(f"{name} holds no questions")
    return out


def _spread(items: Sequence, n: int) -> list:
    """n items spread evenly over ``items`` (deterministic)."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def _bundled(name: str) -> list[dict]:
    text = resources.files("kvdb").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def default_questions(runtime, per_workload: int) -> list[BenchQuestion]:
    """Stored: the store's own questions (built pairs, spread over the store). Paraphrased: the bundled paraphrases
    of the default set whose source question is in the store. Unanswerable: the bundled off-topic questions."""
    from sqlalchemy import select

    from kvdb.store.models import Pair, PairVectors

    with runtime.store.read() as session:
        stored = list(dict.fromkeys(session.scalars(
            select(Pair.question).join(PairVectors, PairVectors.pair_hash == Pair.hash).order_by(Pair.id))))
    if not stored:
        from kvdb.errors import NotBuiltError

        raise NotBuiltError("no pair is built yet; run `kvdb build` first")
    known = set(stored)
    paraphrased = [r["query"] for r in _bundled("paraphrases.jsonl") if r.get("source_question") in known]
    unanswerable = [r["query"] for r in _bundled("unanswerable.jsonl")]
    out = [BenchQuestion(q, "stored") for q in _spread(stored, per_workload)]
    out += [BenchQuestion(q, "paraphrased") for q in _spread(paraphrased, per_workload)]
    out += [BenchQuestion(q, "unanswerable") for q in _spread(unanswerable, per_workload)]
    return out


def _ratio_stats(values: list[float | None]) -> tuple[float | None, float | None]:
    kept = [v for v in values if v is not None]
    return (round(statistics.median(kept), 3), round(min(kept), 3)) if kept else (None, None)


def _summary(rows: list[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for workload in WORKLOADS:
        for method in methods:
            mine = [r for r in rows if r["workload"] == workload and r["method"] == method]
            if not mine:
                continue
            steps = sum(r["verify_steps"] for r in mine)
            kvdb = method.startswith("kvdb")
            median, low = _ratio_stats([r["speedup"] for r in mine])
            median_llama, low_llama = _ratio_stats([r["speedup_llamacpp"] for r in mine])
            out.append({
                "workload": workload, "method": method, "baseline": baseline_of(method), "questions": len(mine),
                "tokens_per_second": round(sum(r["new_tokens"] for r in mine) / sum(r["seconds"] for r in mine), 2),
                "speedup_median": median, "speedup_min": low,
                "speedup_llamacpp_median": median_llama, "speedup_llamacpp_min": low_llama,
                "accepted_per_step": round(sum(r["accepted"] for r in mine) / steps, 3) if kvdb and steps else None,
                "identical": sum(r["identical"] for r in mine),
                "replayed": sum(r.get("replayed", False) for r in mine),
                "ttft_ratio_median": round(statistics.median(r["ttft_ratio"] for r in mine), 3),
            })
    return out


def _seeded_reuse(engine, ids: list[int], boundaries: tuple[int, ...], whole: bool):
    """A state store holding what earlier questions would have left: the states of the prompt's recurring
    prefixes and, for a stored question (``whole``), of its whole prompt. Filled before the timed run."""
    from kvdb.engines.statecache import PrefixReuse, StateCache

    cache = StateCache(None, memory_bytes=1 << 40)
    for cut in [*boundaries, *([len(ids)] if whole else [])]:
        engine.prefill(ids[:cut])
        cache.put(engine.save_state())
    return PrefixReuse(cache, boundaries)


def _llama_prompt_lookup(engine, max_new_tokens: int, eos_ids: Sequence[int]) -> Callable:
    """llama.cpp's own prompt-lookup speculation on the engine's GGUF and settings, as a GenerationResult."""
    import time

    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from kvdb.decode import GenerationResult, result_stats

    llama = Llama(model_path=str(engine.path), n_ctx=engine.max_positions, n_threads=engine.n_threads,
                  n_threads_batch=engine.n_threads, n_batch=engine.n_batch, verbose=False,
                  draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))
    eos = frozenset(eos_ids)

    def run(ids: list[int]) -> GenerationResult:
        llama.reset()  # no prefix reuse from the previous call: every method prefills its prompt
        out: list[int] = []
        t0 = time.perf_counter()
        ttft = None
        for tok in llama.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            out.append(int(tok))
            if tok in eos or len(out) >= max_new_tokens:
                break
        seconds = time.perf_counter() - t0
        return GenerationResult(out, result_stats("llama_cpp", seconds, ttft or seconds, len(out), 0, 0, 0, {}))

    return run


def _plans(answerer, methods: list[str], max_new_tokens: int, depth: int, book, notices: list[str]) -> dict:
    """Per method, a function (ids, result, query, workload) -> GenerationResult; llama.cpp methods are dropped
    from ``methods`` with a notice where that engine cannot run."""
    from kvdb.decode import greedy_generate, speculative_generate
    from kvdb.errors import KvdbError
    from kvdb.prompt import Reference, prefix_boundaries
    from kvdb.replay import replay

    lm = answerer.lm
    eos = lm.eos_ids
    hf = answerer.engine_for("transformers")

    def kvdb(engine, ids, result, query, learned, reuse=None):
        sources = answerer.sources(ids, result, query, book, learned=learned)
        return speculative_generate(engine, ids, max_new_tokens, eos, sources, answerer.policy(engine), reuse=reuse)

    plans: dict[str, Callable] = {
        "greedy": lambda ids, result, query, wl: greedy_generate(hf, ids, max_new_tokens, eos),
        "hf_prompt_lookup": lambda ids, result, query, wl: greedy_generate(hf, ids, max_new_tokens, eos,
                                                                           prompt_lookup_num_tokens=10),
        "hf_early_exit": lambda ids, result, query, wl: greedy_generate(hf, ids, max_new_tokens, eos,
                                                                        assistant_early_exit=depth),
        "kvdb_copy": lambda ids, result, query, wl: kvdb(hf, ids, result, query, False),
        "kvdb_draft": lambda ids, result, query, wl: kvdb(hf, ids, result, query, True),
    }
    if not any(m in LLAMACPP_METHODS for m in methods):
        return plans
    try:
        llama = answerer.engine_for("llama_cpp")
        # llama.cpp's prompt lookup loads a second copy of the model: only when it is asked for.
        lookup = _llama_prompt_lookup(llama, max_new_tokens, eos) if "llamacpp_prompt_lookup" in methods else None
    except (KvdbError, ImportError) as exc:
        notices.append(f"llama.cpp methods skipped: {exc}")
        methods[:] = [m for m in methods if m not in LLAMACPP_METHODS]
        return plans

    def seeded(ids, result, query, wl):
        refs = [Reference(m.question, m.answer) for m in result.matches]
        return _seeded_reuse(llama, ids, prefix_boundaries(lm, query, refs, ids), whole=wl == "stored")

    replays = answerer.knowledge.replay_book(llama)

    def kvdb_llamacpp(ids, result, query, wl):
        """As `kvdb query --generate` answers: for a stored question, this engine's recorded answer to the very
        prompt if there is one (`kvdb train` records them; the benchmark never does), else decoding. Paraphrased
        and unanswerable questions stand for first asks: never replayed, even if asked before in this home."""
        found = replay(replays, llama.name, ids, max_new_tokens) if replays is not None and wl == "stored" else None
        return found or kvdb(llama, ids, result, query, True, seeded(ids, result, query, wl))

    plans.update({
        "llamacpp_greedy": lambda ids, result, query, wl: greedy_generate(llama, ids, max_new_tokens, eos),
        "llamacpp_prompt_lookup": lambda ids, result, query, wl: lookup(ids),
        "kvdb_llamacpp": kvdb_llamacpp,
        "kvdb_llamacpp_nostates": lambda ids, result, query, wl: kvdb(llama, ids, result, query, True),
    })
    return plans


def _choose_methods(methods: Sequence[str], repeat: int) -> list[str]:
    """The methods to run, each engine's baseline first; unknown names refused."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValidationError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if repeat < 1:
        raise ValidationError(f"--repeat must be at least 1, got {repeat}")
    bases = ["greedy", *(["llamacpp_greedy"] if any(m in LLAMACPP_METHODS for m in methods) else [])]
    return [*bases, *(m for m in dict.fromkeys(methods) if m not in bases)]


def _warm(plans: dict, methods: list[str], answerer, question: BenchQuestion, notices: list[str]) -> None:
    """The first passes of a process are slow (allocation, kernel choice): run every method once, untimed; a
    method that cannot run here is dropped with a notice."""
    result, ids, _ = answerer.prepare(question.query, 4)
    for name in list(methods):
        try:
            plans[name](ids, result, question.query, question.workload)
        except Exception as exc:  # e.g. a transformers version without assistant_early_exit for this model
            if name.startswith("kvdb") or name in ("greedy", "llamacpp_greedy"):
                raise
            methods.remove(name)
            notices.append(f"{name} skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


def _question_rows(plans: dict, methods: list[str], answerer, qi: int, q: BenchQuestion, max_new_tokens: int,
                   repeat: int, tick: Callable[[], None]) -> list[dict[str, Any]]:
    """Every method on one question's prompt, ``repeat`` times round-robin; the fastest run of each is kept (on a
    shared machine other work only adds time)."""
    result, ids, _ = answerer.prepare(q.query, max_new_tokens)
    best: dict[str, Any] = {}
    for _ in range(repeat):
        for name in methods:
            res = plans[name](ids, result, q.query, q.workload)
            if name not in best or res.stats["seconds"] < best[name].stats["seconds"]:
                best[name] = res
            tick()
    rows = []
    for name in methods:
        s, base = best[name].stats, best[baseline_of(name)]
        llama = best.get("llamacpp_greedy")
        rows.append({"question": qi, "query": q.query, "workload": q.workload, "method": name,
                     "engine": s.get("engine"), "prompt_tokens": len(ids), "new_tokens": s["new_tokens"],
                     "seconds": s["seconds"], "time_to_first_token": s["time_to_first_token"],
                     "verify_steps": s["verify_steps"], "drafted": s["drafted"], "accepted": s["accepted"],
                     "replayed": bool(s.get("replayed")),
                     "identical": best[name].output_ids == base.output_ids,
                     "speedup": best["greedy"].stats["seconds"] / s["seconds"] if s["seconds"] else 0.0,
                     "speedup_llamacpp": llama.stats["seconds"] / s["seconds"] if llama and s["seconds"] else None,
                     "ttft_ratio": s["time_to_first_token"] / base.stats["time_to_first_token"]
                     if base.stats["time_to_first_token"] else 1.0,
                     "sources": s.get("sources", {})})
    return rows


def run_bench(runtime, questions: Sequence[BenchQuestion], max_new_tokens: int | None = None,
              methods: Sequence[str] = METHODS, repeat: int = 1, draft_path: str | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None, progress: bool = False) -> dict[str, Any]:
    """Run every method on every question's prompt; rows per (question, method) and the summary."""
    from kvdb.answer import Answerer

    methods = _choose_methods(methods, repeat)
    wants_draft = any(m in ("kvdb_draft", "kvdb_llamacpp", "kvdb_llamacpp_nostates") for m in methods)
    answerer = Answerer(runtime, draft_path=draft_path, use_draft=wants_draft)
    notices = list(answerer.notices)
    answerer.notices.clear()
    if "kvdb_draft" in methods and answerer.draft is None:
        methods.remove("kvdb_draft")
        notices.append("kvdb_draft skipped: no trained draft (run `kvdb train`)")
    lm = answerer.lm
    max_new_tokens = max_new_tokens or runtime.config.generation.max_new_tokens
    book = answerer.knowledge.answer_book(max_new_tokens)  # the store's or, with --cache, the cache's recordings
    plans = _plans(answerer, methods, max_new_tokens, runtime.config.draft.num_sampled_layers, book, notices)
    for name in dict.fromkeys(baseline_of(m) for m in methods):
        answerer.pass_plan(answerer.engine_for("llama_cpp" if name == "llamacpp_greedy" else "transformers"))
    notices += answerer.notices  # pass costs are measured (or read) before anything is timed
    _warm(plans, methods, answerer, questions[0], notices)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(questions) * len(methods) * repeat, desc="bench", unit="run", leave=False)
    rows = []
    try:
        for qi, q in enumerate(questions):
            for row in _question_rows(plans, methods, answerer, qi, q, max_new_tokens, repeat,
                                      bar.update if bar is not None else lambda: None):
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    finally:
        if bar is not None:
            bar.close()
    return {"model": lm.ref.name, "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
            "max_new_tokens": max_new_tokens, "repeat": repeat, "draft": answerer.draft_name,
            "methods": methods, "notices": notices, "summary": _summary(rows, methods), "rows": rows}


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| workload | method | tokens/s | vs greedy (median) | vs llama.cpp greedy (median, min) | "
             "accepted/step | identical | TTFT vs its baseline |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in report["summary"]:
        aps = "-" if s["accepted_per_step"] is None else f"{s['accepted_per_step']:.2f}"
        if s.get("replayed"):
            aps = "replayed" if s["replayed"] == s["questions"] else f"{aps} ({s['replayed']} replayed)"
        llama = ("-" if s["speedup_llamacpp_median"] is None
                 else f"{s['speedup_llamacpp_median']:.2f}x, {s['speedup_llamacpp_min']:.2f}x")
        lines.append(f"| {s['workload']} | {s['method']} | {s['tokens_per_second']:.1f} | {s['speedup_median']:.2f}x "
                     f"| {llama} | {aps} | {s['identical']}/{s['questions']} | {s['ttft_ratio_median']:.2f}x |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars: median speedup over greedy per workload, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvdb.fileio import atomic_write_bytes

    methods = report["methods"]
    workloads = [w for w in WORKLOADS if any(s["workload"] == w for s in report["summary"])]
    # Against llama.cpp greedy where it ran (the baseline a CPU user has), else against transformers greedy.
    llama = any(s.get("speedup_llamacpp_median") is not None for s in report["summary"])
    key, baseline = ("speedup_llamacpp_median", "llama.cpp greedy") if llama else ("speedup_median", "greedy")
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, method in enumerate(methods):
        values = [next((s[key] for s in report["summary"]
                        if s["workload"] == w and s["method"] == method), 0.0) for w in workloads]
        bars = ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(workloads))], values, width,
                      label=method)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    if max((s[key] or 0.0) for s in report["summary"]) > 30:  # a replayed answer is a lookup: log scale
        ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel(f"speedup over {baseline} (median)")
    ax.set_title(f"{report['model']} on {report['device']} {report['dtype']}, {report['max_new_tokens']} new tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path = Path(path)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        from kvdb.errors import StoreError

        raise StoreError(f"cannot write the chart {path}: {exc.strerror or exc}") from None
    return path
