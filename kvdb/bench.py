"""`kvdb bench`: answer speed of every decoding method on the same prompts, in one run, against plain greedy.

Methods (all greedy, so every output should equal the baseline's):
  greedy            model.generate(do_sample=False): the baseline
  hf_prompt_lookup  model.generate(prompt_lookup_num_tokens=10)
  hf_early_exit     model.generate(assistant_early_exit=N): Hugging Face's untrained N-layer early-exit draft, N the
                    draft's depth (draft.num_sampled_layers)
  kvdb_copy         kvdb's engine with copying only (recorded answers, retrieved answers, the context)
  kvdb_draft        kvdb's engine with copying and the trained draft (skipped when there is none)
Workloads: stored questions asked verbatim, paraphrased questions (never trained on), questions the store cannot
answer. The prompt of a question is built once (retrieval + chat template) and given to every method; nothing is
written to the store. Per method and workload: tokens/s, speedup over greedy (median of per-question ratios),
accepted draft tokens per verify step, outputs identical to greedy, time to first token relative to greedy.
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
METHODS = ("greedy", "hf_prompt_lookup", "hf_early_exit", "kvdb_copy", "kvdb_draft")


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


def _summary(rows: list[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for workload in WORKLOADS:
        for method in methods:
            mine = [r for r in rows if r["workload"] == workload and r["method"] == method]
            if not mine:
                continue
            steps = sum(r["verify_steps"] for r in mine)
            kvdb = method.startswith("kvdb")
            out.append({
                "workload": workload, "method": method, "questions": len(mine),
                "tokens_per_second": round(sum(r["new_tokens"] for r in mine) / sum(r["seconds"] for r in mine), 2),
                "speedup_median": round(statistics.median(r["speedup"] for r in mine), 3),
                "speedup_min": round(min(r["speedup"] for r in mine), 3),
                "accepted_per_step": round(sum(r["accepted"] for r in mine) / steps, 3) if kvdb and steps else None,
                "identical": sum(r["identical"] for r in mine),
                "ttft_ratio_median": round(statistics.median(r["ttft_ratio"] for r in mine), 3),
            })
    return out


def run_bench(runtime, questions: Sequence[BenchQuestion], max_new_tokens: int | None = None,
              methods: Sequence[str] = METHODS, repeat: int = 1, draft_path: str | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None, progress: bool = False) -> dict[str, Any]:
    """Run every method on every question's prompt; rows per (question, method) and the summary."""
    from kvdb.answer import Answerer
    from kvdb.decode import greedy_generate, speculative_generate

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValidationError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if repeat < 1:
        raise ValidationError(f"--repeat must be at least 1, got {repeat}")
    methods = ["greedy", *(m for m in methods if m != "greedy")]
    answerer = Answerer(runtime, draft_path=draft_path, use_draft="kvdb_draft" in methods)
    notices = list(answerer.notices)
    answerer.notices.clear()
    if "kvdb_draft" in methods and answerer.draft is None:
        methods.remove("kvdb_draft")
        notices.append("kvdb_draft skipped: no trained draft (run `kvdb train`)")
    lm, model = answerer.lm, answerer.lm.model
    depth = runtime.config.draft.num_sampled_layers
    gen_cfg = runtime.config.generation
    max_new_tokens = max_new_tokens or gen_cfg.max_new_tokens
    book = answerer.knowledge.answer_book(max_new_tokens)  # the store's or, with --cache, the cache's recordings

    def kvdb(ids, result, query, learned):
        sources = answerer.sources(ids, result, query, book, learned=learned)
        return speculative_generate(answerer.engine, ids, max_new_tokens, lm.eos_ids, sources, answerer.policy())

    plans: dict[str, Callable] = {
        "greedy": lambda ids, result, query: greedy_generate(answerer.engine, ids, max_new_tokens, lm.eos_ids),
        "hf_prompt_lookup": lambda ids, result, query: greedy_generate(model, ids, max_new_tokens, lm.eos_ids,
                                                                       prompt_lookup_num_tokens=10),
        "hf_early_exit": lambda ids, result, query: greedy_generate(model, ids, max_new_tokens, lm.eos_ids,
                                                                    assistant_early_exit=depth),
        "kvdb_copy": lambda ids, result, query: kvdb(ids, result, query, False),
        "kvdb_draft": lambda ids, result, query: kvdb(ids, result, query, True),
    }
    answerer.pass_plan()  # measured (or read) before anything is timed
    notices += answerer.notices
    # The first passes of a process are slow (allocation, kernel choice): warm every method once, untimed.
    result, ids, _ = answerer.prepare(questions[0].query, 4)
    for name in list(methods):  # a copy: a method that cannot run is dropped from ``methods``
        try:
            plans[name](ids, result, questions[0].query)
        except Exception as exc:  # e.g. a transformers version without assistant_early_exit for this model
            if name.startswith("kvdb") or name == "greedy":
                raise
            methods.remove(name)
            notices.append(f"{name} skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(questions) * len(methods) * repeat, desc="bench", unit="run", leave=False)
    rows = []
    try:
        for qi, q in enumerate(questions):
            result, ids, _ = answerer.prepare(q.query, max_new_tokens)
            best: dict[str, Any] = {}
            same: dict[str, bool] = {}
            baseline = None
            for _ in range(repeat):  # round-robin; on a shared machine other work only adds time: keep the fastest
                for name in methods:
                    res = plans[name](ids, result, q.query)
                    if baseline is None:
                        baseline = res.output_ids
                    same[name] = same.get(name, True) and res.output_ids == baseline
                    if name not in best or res.stats["seconds"] < best[name].stats["seconds"]:
                        best[name] = res
                    if bar is not None:
                        bar.update(1)
            base = best["greedy"].stats
            for name in methods:
                s = best[name].stats
                row = {"question": qi, "query": q.query, "workload": q.workload, "method": name,
                       "prompt_tokens": len(ids), "new_tokens": s["new_tokens"], "seconds": s["seconds"],
                       "time_to_first_token": s["time_to_first_token"], "verify_steps": s["verify_steps"],
                       "drafted": s["drafted"], "accepted": s["accepted"], "identical": same[name],
                       "speedup": base["seconds"] / s["seconds"] if s["seconds"] else 0.0,
                       "ttft_ratio": s["time_to_first_token"] / base["time_to_first_token"]
                       if base["time_to_first_token"] else 1.0,
                       "sources": s.get("sources", {})}
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
    lines = ["| workload | method | tokens/s | speedup (median) | speedup (min) | accepted/step | identical | "
             "TTFT vs greedy |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in report["summary"]:
        aps = "-" if s["accepted_per_step"] is None else f"{s['accepted_per_step']:.2f}"
        lines.append(f"| {s['workload']} | {s['method']} | {s['tokens_per_second']:.1f} | {s['speedup_median']:.2f}x "
                     f"| {s['speedup_min']:.2f}x | {aps} | {s['identical']}/{s['questions']} "
                     f"| {s['ttft_ratio_median']:.2f}x |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars: median speedup over greedy per workload, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvdb.fileio import atomic_write_bytes

    methods = report["methods"]
    workloads = [w for w in WORKLOADS if any(s["workload"] == w for s in report["summary"])]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, method in enumerate(methods):
        values = [next((s["speedup_median"] for s in report["summary"]
                        if s["workload"] == w and s["method"] == method), 0.0) for w in workloads]
        bars = ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(workloads))], values, width,
                      label=method)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("speedup over greedy (median)")
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
