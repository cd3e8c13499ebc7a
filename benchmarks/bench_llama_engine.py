"""llama.cpp engine cost shape on the embedded SmolLM2-135M GGUF: what a k-token verify pass costs in one-token steps
after a ~220-token chat prompt, what prefill costs a token, and what restoring a saved prompt state costs against
recomputing its prefill (in memory, and through the on-disk state store).

    .venv/bin/python benchmarks/bench_llama_engine.py                 # 2 threads, best of 5
    .venv/bin/python benchmarks/bench_llama_engine.py --threads 1 --reps 9 --json out.json

Numbers are the best wall-clock time of a few runs, on whatever else the machine is running; compare them within one
run only, and prefer --threads 1 on a busy machine (two OpenMP threads spin against the neighbours).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvdb.engines.llama_cpp import LlamaCppEngine, build_identity, exact_build  # noqa: E402
from kvdb.engines.statecache import StateCache, describe_key  # noqa: E402
from kvdb.identity import embedded_file  # noqa: E402

KS = (1, 2, 4, 8, 16, 32)
PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant. Answer the question using the reference when it helps, "
    "in a few clear sentences.<|im_end|>\n<|im_start|>user\nReference: A KV cache stores the attention keys and "
    "values of every token a transformer has already processed, so that generating the next token only needs the new "
    "token's query, key and value. Without it, every step would recompute attention over the whole prefix, and the "
    "cost of generating n tokens would grow quadratically. Speculative decoding drafts several tokens cheaply and "
    "verifies them with the large model in one forward pass; the output is unchanged when every accepted token is the "
    "model's own greedy choice. Prefix caching keeps the KV state of prompts that recur, such as a system prompt or "
    "a retrieved document, and restores it instead of recomputing it. Restoring is exact when the engine computes "
    "every position the same way whether it arrives alone or in a batch.\n\nQuestion: What does a KV cache store, why "
    "does it make generation faster, and what does prefix caching add?<|im_end|>\n<|im_start|>assistant\n")


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    """The fastest of ``reps`` runs: on a shared CPU the other runs measure the neighbours, not the engine."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def pass_costs(engine: LlamaCppEngine, prompt: list[int], tokens: list[int], reps: int) -> dict[int, float]:
    """Seconds of one verify pass of k tokens after the prompt (the pass is rolled back after each run)."""
    engine.prefill(prompt)
    n = engine.n_positions

    def once(k: int) -> None:
        engine.verify(tokens[:k])
        engine.rollback(n)

    once(1)  # warm-up
    return {k: best_seconds(lambda k=k: once(k), reps) for k in KS}


def state_costs(engine: LlamaCppEngine, prompt: list[int], reps: int) -> dict[str, float]:
    """Prefill against restoring the prompt's saved state, in memory and from a fresh on-disk store."""
    prefill = best_seconds(lambda: engine.prefill(prompt), reps)
    engine.prefill(prompt)
    state = engine.save_state()
    restore = best_seconds(lambda: engine.restore_state(state), reps)
    with tempfile.TemporaryDirectory() as folder:
        StateCache(Path(folder)).put(state)
        key = describe_key(engine.describe())

        def from_disk() -> None:
            engine.restore_state(StateCache(Path(folder)).get(prompt, key))

        disk = best_seconds(from_disk, reps)
    return {"prefill_s": prefill, "restore_memory_s": restore, "restore_disk_s": disk,
            "state_bytes": len(state.kv), "bytes_per_token": engine.state_bytes_per_token(state)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    path = embedded_file("embedded:smollm2")
    ident = build_identity()
    print(f"llama-cpp-python {ident['llama_cpp_python']}, LLAMAFILE={ident['llamafile']} REPACK={ident['repack']} "
          f"(exact batched rows: {exact_build()}), {args.threads} threads, best of {args.reps}")
    with LlamaCppEngine(path, n_ctx=1024, n_threads=args.threads, fingerprint="bench") as engine:
        prompt = engine.tokenize(PROMPT)
        answer = engine.greedy(prompt, 40, eos_ids=())
        costs = pass_costs(engine, prompt, answer, args.reps)
        states = state_costs(engine, prompt, args.reps)

    step = costs[1]
    print(f"\ncontext {len(prompt)} tokens; one-token step {1000 * step:.1f} ms")
    print("k   pass ms   in steps   steps/token")
    for k, s in costs.items():
        print(f"{k:<3} {1000 * s:8.1f}   {s / step:8.2f}   {s / step / k:11.2f}")
    per_token = states["prefill_s"] / len(prompt)
    print(f"\nprefill {1000 * states['prefill_s']:.1f} ms ({1000 * per_token:.2f} ms a token, "
          f"{per_token / step:.2f} steps a token)")
    print(f"restore saved state: {1000 * states['restore_memory_s']:.2f} ms from memory, "
          f"{1000 * states['restore_disk_s']:.2f} ms from disk "
          f"({states['prefill_s'] / states['restore_memory_s']:.0f}x / "
          f"{states['prefill_s'] / states['restore_disk_s']:.0f}x faster than prefill); "
          f"{states['state_bytes'] / 1e6:.2f} MB, {states['bytes_per_token'] / 1024:.1f} KiB a token")
    if args.json:
        args.json.write_text(json.dumps({"build": ident, "threads": args.threads, "prompt_tokens": len(prompt),
                                         "pass_seconds": costs, **states}, indent=1))


if __name__ == "__main__":
    main()
