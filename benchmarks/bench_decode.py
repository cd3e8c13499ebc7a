"""Speed of `kvdb query --generate`'s decoding against plain greedy and Hugging Face prompt lookup, same run.

For a few questions of the default knowledge set, the prompt carries the pair itself as its reference (what a
confident retrieval gives). Methods, each producing max_new_tokens at most:
  greedy          model.generate(do_sample=False): the baseline every output must equal
  hf-lookup       model.generate(prompt_lookup_num_tokens=10)
  plain           speculative_generate without sources (our decoding loop alone)
  copy-ref        speculative_generate + CopySource over the reference answer tokens
  copy-ref+ctx    the same, also searching the context (prompt + output so far), as prompt lookup does
  exact-repeat    speculative_generate + ExactAnswerSource fed the greedy output (a repeated question)
  always-wrong    speculative_generate + a source whose every draft is wrong (the cost of failing drafts)

Speedup is the median over questions of greedy seconds / method seconds (prefill included, as in `seconds`); each
method runs --repeat times per question, round-robin, and its fastest run counts. "identical" covers every run.

    .venv/bin/python benchmarks/bench_decode.py [--home DIR] [--questions 6 | --pick 0,5,11] [--threads N]
        [--max-new-tokens 96] [--json]

Questions are spread over the file (every len/N-th); --pick chooses line numbers (0-based) instead. On a shared
2-core machine use --threads 1: a second thread competing with other work slows each pass many times over.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvdb.config import Home, load_config  # noqa: E402
from kvdb.decode import GenerationResult, greedy_generate, speculative_generate  # noqa: E402
from kvdb.engines.transformers import TransformersEngine  # noqa: E402
from kvdb.policy import DraftPolicy  # noqa: E402
from kvdb.sources import CopySource, ExactAnswerSource  # noqa: E402
from kvdb.lm import load_model  # noqa: E402
from kvdb.prompt import Reference, prompt_ids  # noqa: E402

FAQ = Path(__file__).resolve().parent.parent / "kvdb" / "data" / "default_faq.jsonl"


class AlwaysWrong:
    """Proposes k tokens that are all wrong: each is the greedy answer's token + 1 (known from the greedy run)."""

    name = "wrong"

    def __init__(self, prompt: list[int], answer: list[int], vocab: int):
        self.prompt, self.answer, self.vocab = prompt, answer, vocab

    def propose(self, context: list[int], k: int) -> list[int]:
        done = len(context) - len(self.prompt)
        return [(t + 1) % self.vocab for t in self.answer[done:done + k]]


def hf_prompt_lookup(model, prompt: list[int], max_new_tokens: int, eos: list[int]) -> GenerationResult:
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, prompt_lookup_num_tokens=10, eos_token_id=eos,
                             pad_token_id=model.generation_config.pad_token_id or eos[0])
        new = out[0, len(prompt):].tolist()
        seconds = time.perf_counter() - t0
    return GenerationResult(new, {"seconds": seconds, "new_tokens": len(new), "verify_steps": 0, "drafted": 0,
                                  "accepted": 0})


def pick_questions(n: int, pick: str | None) -> list[tuple[int, dict]]:
    rows = [json.loads(line) for line in FAQ.read_text(encoding="utf-8").splitlines() if line.strip()]
    if pick:
        return [(int(i), rows[int(i)]) for i in pick.split(",")]
    step = max(1, len(rows) // n)
    return list(enumerate(rows))[::step][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", help="KVDB_HOME holding the converted model (default: $KVDB_HOME or ./var)")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--pick", help="comma-separated 0-based line numbers of kvdb/data/default_faq.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method and question; the fastest counts")
    ap.add_argument("--methods", default="greedy,hf-lookup,plain,copy-ref,copy-ref+ctx,exact-repeat,always-wrong")
    ap.add_argument("--json", action="store_true", help="print per-question rows and the summary as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    home = Home.resolve(args.home)
    if not home.root.exists():
        home = Home.resolve(tempfile.mkdtemp(prefix="kvdb-bench-"))

    t0 = time.perf_counter()
    lm = load_model(load_config().model, home)
    model, eos, n_new = lm.model, lm.eos_ids, args.max_new_tokens
    engine = TransformersEngine(model, fingerprint=lm.fingerprint)  # what speculative_generate runs on
    vocab = model.get_output_embeddings().weight.shape[0]
    print(f"# {lm.ref.name} on {lm.device} {str(lm.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads, "
          f"loaded in {time.perf_counter() - t0:.1f} s; max_new_tokens={n_new}", file=sys.stderr)
    methods = ["greedy", *(m for m in args.methods.split(",") if m != "greedy")]
    known = {"greedy", "hf-lookup", "plain", "copy-ref", "copy-ref+ctx", "exact-repeat", "always-wrong"}
    unknown = set(methods) - known
    if unknown:
        ap.error(f"unknown method(s): {', '.join(sorted(unknown))}")

    rows = []
    questions = pick_questions(args.questions, args.pick)
    warm = prompt_ids(lm, questions[0][1]["question"], [])
    greedy_generate(model, warm, 4, eos)  # first passes are slow (allocations, kernel selection): not timed
    speculative_generate(engine, warm, 4, eos, [CopySource([warm])])
    for qi, row in questions:
        prompt = prompt_ids(lm, row["question"], [Reference(row["question"], row["answer"])])
        ref_ids = lm.encode(row["answer"])
        base = greedy_generate(model, prompt, n_new, eos)  # the reference output (and an untimed warm-up)
        plan = {
            "greedy": lambda: greedy_generate(model, prompt, n_new, eos),
            "hf-lookup": lambda: hf_prompt_lookup(model, prompt, n_new, eos),
            "plain": lambda: speculative_generate(engine, prompt, n_new, eos, []),
            "copy-ref": lambda: speculative_generate(engine, prompt, n_new, eos, [CopySource([ref_ids])]),
            "copy-ref+ctx": lambda: speculative_generate(engine, prompt, n_new, eos,
                                                         [CopySource([ref_ids], search_context=True)]),
            "exact-repeat": lambda: speculative_generate(engine, prompt, n_new, eos,
                                                         [ExactAnswerSource(prompt, base.output_ids)]),
            "always-wrong": lambda: speculative_generate(engine, prompt, n_new, eos,
                                                         [AlwaysWrong(prompt, base.output_ids, vocab)], DraftPolicy()),
        }
        # Round-robin repeats, fastest run kept: on a shared machine, other work only ever adds time.
        runs: dict[str, GenerationResult] = {}
        same: dict[str, bool] = {}
        for _ in range(args.repeat):
            for name in methods:
                res = plan[name]()
                same[name] = same.get(name, True) and res.output_ids == base.output_ids
                if name not in runs or res.stats["seconds"] < runs[name].stats["seconds"]:
                    runs[name] = res
        base_s = runs["greedy"].stats["seconds"]
        for name, res in runs.items():
            s = res.stats
            rows.append({"question": qi, "method": name, "prompt_tokens": len(prompt),
                         "new_tokens": len(res.output_ids),
                         "seconds": s["seconds"], "verify_steps": s["verify_steps"], "drafted": s["drafted"],
                         "accepted": s["accepted"], "identical": same[name], "speedup": base_s / s["seconds"]})
        print(f"q{qi}: {len(prompt)} prompt tokens, {len(base.output_ids)} new; "
              + ", ".join(f"{n} {base_s / r.stats['seconds']:.2f}x" for n, r in runs.items()), file=sys.stderr)

    summary = []
    for name in [m for m in methods if any(r["method"] == m for r in rows)]:
        mine = [r for r in rows if r["method"] == name]
        steps = sum(r["verify_steps"] for r in mine)
        summary.append({
            "method": name,
            "tokens_per_s": sum(r["new_tokens"] for r in mine) / sum(r["seconds"] for r in mine),
            "speedup_median": statistics.median(r["speedup"] for r in mine),
            "speedup_min": min(r["speedup"] for r in mine),
            "accepted_per_step": (sum(r["accepted"] for r in mine) / steps) if steps else None,
            "verify_steps": steps,
            "identical": sum(r["identical"] for r in mine),  # outputs equal to greedy's, of len(mine)
            "outputs": len(mine),
        })
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=1))
        return
    print("| method | tokens/s | speedup (median) | speedup (min) | accepted/step | verify steps | identical |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for s in summary:
        aps = "-" if s["accepted_per_step"] is None or s["method"] in ("greedy", "hf-lookup") \
            else f"{s['accepted_per_step']:.2f}"
        steps = "-" if s["method"] == "hf-lookup" else s["verify_steps"]
        print(f"| {s['method']} | {s['tokens_per_s']:.1f} | {s['speedup_median']:.2f}x | {s['speedup_min']:.2f}x "
              f"| {aps} | {steps} | {s['identical']}/{s['outputs']} |")
    names = [s["method"] for s in summary]
    print("\nSpeedup over greedy per question (line of default_faq.jsonl: prompt tokens, new tokens)\n")
    print("| question | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for qi, _ in questions:
        mine = {r["method"]: r for r in rows if r["question"] == qi}
        first = mine[names[0]]
        print(f"| {qi}: {first['prompt_tokens']}, {first['new_tokens']} | "
              + " | ".join(f"{mine[n]['speedup']:.2f}x" for n in names) + " |")


if __name__ == "__main__":
    main()
