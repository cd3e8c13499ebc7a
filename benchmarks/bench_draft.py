"""Draft benchmark: train the knowledge-aware draft on the default set with the embedded SmolLM2-135M, then measure
it on paraphrased questions it never saw (kvdb/data/paraphrases.jsonl; never trained on).

Reports: held-out top-1 agreement with the base model along its own greedy answers (trained draft, the same draft
without its knowledge, the untrained 3-layer early exit), split by pairs the draft trained on vs the held-out pairs;
simulated tokens per verify step for draft lengths 1/2/4/8 (Leviathan et al.); the trained draft's agreement split by where each base-model token could be copied from (the
recorded answer to the top pair's question, its reference answer, both, neither); the draft's per-token cost
against one base-model token; an estimated speedup from those; and the wall-clock (and CPU) time of training, data
preparation included.

    .venv/bin/python benchmarks/bench_draft.py                       # fresh temporary home, defaults
    .venv/bin/python benchmarks/bench_draft.py --home /tmp/bench-home --keep --json out.json
    .venv/bin/python benchmarks/bench_draft.py --no-variants --epochs 8

The CPU here is often shared; ``--threads 1`` is much faster than 2 when other processes keep both cores busy.
Base answers, retrieval and the converted model are cached in the home, so a second run with ``--home`` only trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvdb.build import Builder  # noqa: E402
from kvdb.config import Home, load_config  # noqa: E402
from kvdb.draft import DraftModel, LearnedDraftSource, load_draft, load_recorded_knowledge  # noqa: E402
from kvdb.examples import load_examples  # noqa: E402
from kvdb.lm import load_model  # noqa: E402
from kvdb.prompt import prompt_ids  # noqa: E402
from kvdb.runtime import Runtime  # noqa: E402
from kvdb.evaluate import DRAFT_LENGTHS, match_vector, summarise  # noqa: E402
from kvdb.losses import knowledge_of  # noqa: E402
from kvdb.recorded import AnswerBook, AnswerRequest  # noqa: E402
from kvdb.teacher import compute_answers, fill_answer_states  # noqa: E402
from kvdb.train import frozen_states, train  # noqa: E402
from kvdb.train_data import (  # noqa: E402
    Example,
    attach_recorded,
    default_references,
    load_store_sources,
    split_pairs,
)

PARAPHRASES = Path(__file__).resolve().parent.parent / "kvdb" / "data" / "paraphrases.jsonl"


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def setup_home(home: Path, config, models_from: Path | None) -> dict:
    rt = Runtime(Home.resolve(home), config)
    if models_from and models_from.is_dir() and not rt.home.models_dir.exists():
        rt.home.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(models_from, rt.home.models_dir)  # skip the 20 s GGUF conversion
    t0 = time.perf_counter()
    added = load_examples(rt.store, config.store).as_dict()
    report = Builder(config, rt.home, rt.store).run(progress=False).as_dict()
    return {"examples": added, "build_seconds": round(time.perf_counter() - t0, 1), "built": report["built"]}


def paraphrase_examples(rt, lm, sources, limit: int, seed: int, rerank: bool | None, progress: bool):
    rows = [json.loads(line) for line in PARAPHRASES.read_text().splitlines() if line.strip()]
    by_question = {p.question: p.hash for p in sources.pairs}
    rows = [r for r in rows if r["source_question"] in by_question]
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    refs_for = default_references(rt, lm, sources, rt.config.index.top_k, rerank=rerank)
    if hasattr(refs_for, "prime"):
        refs_for.prime([r["query"] for r in rows])
    requests, meta = [], []
    for r in rows:
        refs = list(refs_for(r["query"]))
        requests.append(AnswerRequest(prompt_ids(lm, r["query"], refs), group=tuple(x.hash for x in refs)))
        meta.append((r, refs))
    book = AnswerBook(rt, lm, rt.config.generation.max_new_tokens, replace_stored=False)
    compute_answers(book, requests, rt.config.training.answer_batch_size, progress)
    out = []
    for req, (r, refs) in zip(requests, meta):
        ex = Example(by_question[r["source_question"]], r["query"], r.get("kind", "paraphrase"),
                     [x.hash for x in refs if x.hash in sources.knowledge], req.prompt, req.output)
        ex.hit = by_question[r["source_question"]] in [x.hash for x in refs]
        out.append(ex)
    n = rt.config.draft.num_sampled_layers
    fill_answer_states(rt, lm, sorted({n, lm.num_layers}))
    recorded = load_recorded_knowledge(rt.store, lm.fingerprint, [p.hash for p in sources.pairs], n, lm.num_layers)
    attach_recorded(out, recorded, {p.hash: p.question for p in sources.pairs})
    return out


def copyable(answer: list[int], source: list[int], i: int, n: int = 2) -> bool:
    """Whether ``answer[i]`` follows the ``n`` tokens before it somewhere in ``source`` (an n-gram copy finds it)."""
    ctx = answer[max(0, i - n) : i]
    return any(source[j - len(ctx) : j] == ctx and source[j] == answer[i] for j in range(len(ctx), len(source)))


def by_origin(examples, matches, knowledge) -> dict:
    """Top-1 agreement split by where each base-model token could come from: a 2-gram copy from the recorded
    answer to the top pair's question, from that pair's reference answer, from both, or from neither (the draft
    must predict the base model's own wording there)."""
    out: dict[str, list[int]] = {}
    for e, m in zip(examples, matches):
        rec = e.recorded.next_ids.tolist() if e.recorded is not None else []
        ref = knowledge[e.refs[0]].next_ids.tolist() if e.refs and e.refs[0] in knowledge else []
        for i, hit in enumerate(m):
            kind = {(True, True): "recorded+reference", (True, False): "recorded", (False, True): "reference",
                    (False, False): "neither"}[(copyable(e.answer, rec, i), copyable(e.answer, ref, i))]
            c = out.setdefault(kind, [0, 0])
            c[0] += 1
            c[1] += bool(hit)
    total = sum(c[0] for c in out.values()) or 1
    return {k: {"share": round(c[0] / total, 3), "top1": round(c[1] / c[0], 3)} for k, c in sorted(out.items())}


def measure(draft, examples, knowledge, use_knowledge=True, full_vocab=False) -> list[list[bool]]:
    return [match_vector(draft, e, knowledge, use_knowledge, full_vocab)[0] for e in examples]


@torch.inference_mode()
def per_token_costs(lm, draft, untrained, example, knowledge, repeats: int = 24) -> dict:
    """Seconds per token: base model decode step (KV cache), verify passes of 1+k tokens, draft steps."""
    from transformers import DynamicCache

    ctx = example.prompt + example.answer[:-1]
    model = lm.model

    def base_cache(n):
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([ctx[:n]], device=lm.device), cache=cache, use_cache=True, logits_to_keep=1)
        return cache

    n0 = len(ctx) - repeats - 10
    cache = base_cache(n0)
    t0 = time.perf_counter()
    for i in range(repeats):
        model(input_ids=torch.tensor([[ctx[n0 + i]]], device=lm.device), cache=cache, use_cache=True)
    base = (time.perf_counter() - t0) / repeats
    verify = {}
    for k in DRAFT_LENGTHS:
        cache = base_cache(n0)
        t0 = time.perf_counter()
        reps = 6
        for i in range(reps):
            model(input_ids=torch.tensor([ctx[n0 : n0 + k + 1]], device=lm.device), cache=cache, use_cache=True)
            cache.crop(-(k + 1))
        verify[str(k)] = (time.perf_counter() - t0) / reps

    def draft_cost(d, know, use_knowledge):
        src = LearnedDraftSource(d, lm, know, use_knowledge=use_knowledge)
        src.propose(ctx[:n0], 1)
        t0 = time.perf_counter()
        for i in range(repeats):  # one drafted token: a forward of one token
            src._feed([ctx[n0 + i]])
            int(src._next_logits.argmax())
        return (time.perf_counter() - t0) / repeats

    k = knowledge_of(example, knowledge, draft)
    return {"base_token": base, "verify": verify, "draft_token": draft_cost(draft, k, True),
            "draft_token_no_knowledge": draft_cost(draft, None, False),
            "early_exit_token": draft_cost(untrained, None, False)}


def speedups(tokens_per_step: dict, costs: dict, key: str) -> dict:
    """Leviathan's walltime factor with measured costs: tokens per step x base token / (verify + k drafts)."""
    out = {}
    for k in DRAFT_LENGTHS:
        step = costs["verify"][str(k)] + k * costs[key]
        out[str(k)] = round(tokens_per_step[str(k)]["tokens_per_step"] * costs["base_token"] / step, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, help="KVDB_HOME to use (default: a fresh temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary home")
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--models-from", type=Path, default=None,
                    help="a home's models/ folder to copy (skips the one-off GGUF conversion)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument("--trainable-layers", type=int, default=None)
    ap.add_argument("--vocab-frequent", type=int, default=None)
    ap.add_argument("--holdout", type=float, default=None)
    ap.add_argument("--paraphrases", type=int, default=0, help="how many paraphrases to evaluate (0: all 210)")
    ap.add_argument("--rerank", choices=["config", "on", "off"], default="config",
                    help="re-rank the paraphrases' references as `kvdb query` would (config) or force it")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the home's best checkpoint, no training")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet

    config = load_config(args.config)
    training, draft_cfg = config.training, config.draft
    if args.no_variants:
        training = dataclasses.replace(training, use_variants=False)
    if args.holdout is not None:
        training = dataclasses.replace(training, holdout_fraction=args.holdout)
    if args.trainable_layers is not None:
        draft_cfg = dataclasses.replace(draft_cfg, trainable_layers=args.trainable_layers)
    if args.vocab_frequent is not None:
        draft_cfg = dataclasses.replace(draft_cfg, vocab_frequent=args.vocab_frequent)
    config = dataclasses.replace(config, training=training, draft=draft_cfg)

    temp = None
    home = args.home
    if home is None:
        temp = Path(tempfile.mkdtemp(prefix="kvdb-bench-draft-"))
        home = temp / "home"
    results: dict = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                     "load_average": os.getloadavg()[0], "config": {"training": dataclasses.asdict(training),
                                                                    "draft": dataclasses.asdict(draft_cfg)}}
    try:
        results["setup"] = setup_home(home, config, args.models_from)
        rt = Runtime(Home.resolve(home), config)
        lm = load_model(config.model, rt.home)

        # -- training, data preparation included ----------------------------------------------------------------
        wall, cpu = time.perf_counter(), cpu_seconds()
        trained = train(rt, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, progress=progress, lm=lm,
                        eval_only=args.eval_only)
        results["train"] = {"wall_seconds": round(time.perf_counter() - wall, 1),
                            "cpu_seconds": round(cpu_seconds() - cpu, 1),
                            "seconds_data": trained.get("seconds_data"), "data": trained["data"],
                            "heldout_metrics": trained["metrics"], "best": trained.get("best"),
                            "history": [{"epoch": h["epoch"], "train_loss": h["train_loss"],
                                         "heldout_top1": h["heldout"]["top1_agreement"],
                                         "heldout_loss": h["heldout"].get("loss"), "seconds": h["seconds"]}
                                        for h in json.loads(Path(trained["log"]).read_text())["epochs"]]
                            if trained.get("log") else []}
        best = (trained.get("best") or {}).get("path") or trained.get("checkpoint")

        # -- paraphrases the draft never saw ---------------------------------------------------------------------
        sources = load_store_sources(rt, lm.fingerprint, draft_cfg.num_sampled_layers, lm.num_layers)
        rerank = None if args.rerank == "config" else args.rerank == "on"
        t0 = time.perf_counter()
        paras = paraphrase_examples(rt, lm, sources, args.paraphrases, training.seed, rerank, progress)
        results["paraphrase_answers_seconds"] = round(time.perf_counter() - t0, 1)
        heldout_pairs = split_pairs([p.hash for p in sources.pairs], training.holdout_fraction, training.seed)

        draft = load_draft(best, lm)
        # The untrained early exit: the first n layers of the base model, its final norm and its full head.
        untrained = DraftModel(lm, dataclasses.replace(draft.cfg, vocab_frequent=0))
        frozen_states(draft, paras)
        variants = {
            "trained draft": measure(draft, paras, sources.knowledge),
            "trained draft, knowledge off": measure(draft, paras, sources.knowledge, use_knowledge=False),
            "untrained early exit": measure(untrained, paras, sources.knowledge, use_knowledge=False,
                                            full_vocab=True),
        }
        table = {}
        for name, matches in variants.items():
            seen = [m for m, e in zip(matches, paras) if e.pair not in heldout_pairs]
            unseen = [m for m, e in zip(matches, paras) if e.pair in heldout_pairs]
            table[name] = {"all": summarise(matches), "trained_pairs": summarise(seen),
                           "heldout_pairs": summarise(unseen) if unseen else None}
        results["paraphrases"] = {"count": len(paras), "retrieval_top_k_hit": sum(e.hit for e in paras),
                                  "heldout_pair_paraphrases": sum(e.pair in heldout_pairs for e in paras),
                                  "table": table,
                                  "by_origin": by_origin(paras, variants["trained draft"], sources.knowledge)}

        # -- costs and estimated speedups -------------------------------------------------------------------------
        longest = max(paras, key=lambda e: len(e.prompt) + len(e.answer))
        costs = per_token_costs(lm, draft, untrained, longest, sources.knowledge)
        results["costs"] = {k: (round(v, 5) if isinstance(v, float) else {kk: round(vv, 5) for kk, vv in v.items()})
                            for k, v in costs.items()}
        base_token = costs["base_token"]
        results["cost_ratio"] = {"draft": round(costs["draft_token"] / base_token, 3),
                                 "draft_no_knowledge": round(costs["draft_token_no_knowledge"] / base_token, 3),
                                 "early_exit": round(costs["early_exit_token"] / base_token, 3)}
        results["estimated_speedup"] = {
            "trained draft": speedups(table["trained draft"]["all"]["draft_lengths"], costs, "draft_token"),
            "untrained early exit": speedups(table["untrained early exit"]["all"]["draft_lengths"], costs,
                                             "early_exit_token"),
        }
    finally:
        if temp is not None and not args.keep:
            shutil.rmtree(temp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    report(results)


def report(r: dict) -> None:
    t = r.get("train", {})
    print(f"\nthreads {r['threads']} of {r['cpus']} CPUs, load average at start {r['load_average']:.1f}")
    if t and t.get("seconds_data") is None:  # --eval-only: nothing trained
        print(f"evaluated {r.get('checkpoint')}: held-out top-1 {t['heldout_metrics']['top1_agreement']:.3f}")
    elif t:
        d = t["data"]
        print(f"training: {t['wall_seconds']:.0f} s wall ({t['cpu_seconds']:.0f} s CPU), data preparation "
              f"{t['seconds_data']:.0f} s; {d['train_examples']} training / {d['heldout_examples']} held-out "
              f"questions, {d['recorded']} base answers computed, {d['reused']} reused")
        for h in t["history"]:
            print(f"  epoch {h['epoch']}: train loss {h['train_loss']:.3f}, held-out loss {h['heldout_loss']}, "
                  f"held-out top-1 {h['heldout_top1']:.3f} ({h['seconds']:.0f} s)")
    p = r.get("paraphrases")
    if not p:
        return
    print(f"\nparaphrases never trained on: {p['count']} ({p['heldout_pair_paraphrases']} of held-out pairs); "
          f"source pair among the references for {p['retrieval_top_k_hit']}")
    print("| draft | top-1 all | top-1 trained pairs | top-1 held-out pairs | tokens/step k=1 | k=2 | k=4 | k=8 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in p["table"].items():
        a = row["all"]
        dl = a["draft_lengths"]
        unseen = f"{row['heldout_pairs']['top1_agreement']:.3f}" if row["heldout_pairs"] else "-"
        print(f"| {name} | {a['top1_agreement']:.3f} | {row['trained_pairs']['top1_agreement']:.3f} | {unseen} | " +
              " | ".join(f"{dl[str(k)]['tokens_per_step']:.2f}" for k in DRAFT_LENGTHS) + " |")
    if p.get("by_origin"):
        print("trained draft by where the base model's token could be copied from (2-gram): " + "; ".join(
            f"{k} {v['share']:.0%} of tokens, top-1 {v['top1']:.3f}" for k, v in p["by_origin"].items()))
    c, ratio = r["costs"], r["cost_ratio"]
    print(f"\nper token: base {c['base_token'] * 1000:.1f} ms; draft {c['draft_token'] * 1000:.1f} ms "
          f"({ratio['draft']:.2f}x base), draft without knowledge {ratio['draft_no_knowledge']:.2f}x, "
          f"untrained early exit (full head) {ratio['early_exit']:.2f}x; verify of 1+k tokens: " +
          ", ".join(f"k={k} {v * 1000:.0f} ms" for k, v in c["verify"].items()))
    for name, s in r["estimated_speedup"].items():
        print(f"estimated speedup, {name}: " + ", ".join(f"k={k} {v:.2f}x" for k, v in s.items()))


if __name__ == "__main__":
    main()
