"""How the prompt's wording changes what copying can cover: an experiment behind kvdb.prompt's INSTRUCTION.

The answer is lossless against plain greedy decoding of *the same prompt*, so the prompt decides how much of the base
model's answer a draft can predict. For each candidate instruction this computes the base model's greedy answers to
paraphrased and unanswerable questions, the answers to the top pair's own question under the same instruction (what
`kvdb train` records and copies draw on), and replays the copy source kvdb uses with an oracle policy (as
benchmarks/copy_ceiling.py): speedup in plain-step units from this machine's pass costs. Beside it, answer quality
proxies: for paraphrases, the share of the answer's tokens that come from the top reference answer (grounding); for
unanswerable questions, the same share (lower is better: copying an unrelated reference is a wrong answer).

    .venv/bin/python benchmarks/prompt_format.py --home var [--per-workload 12] [--variants current,history]

Measured 2026-12-01 (default set, SmolLM2-135M fp32, 2 CPU cores, 12 questions per workload, ~4.3 min per variant;
oracle copy speedup median / share of answer tokens from the top reference):

    variant    paraphrased    unanswerable
    current    1.37x / 0.23   1.05x / 0.03
    faq        1.28x / 0.26   1.12x / 0.03
    grounded   1.41x / 0.24   1.10x / 0.03
    prefer     1.39x / 0.31   1.10x / 0.03
    history    1.43x / 0.22   1.12x / 0.04   (references as earlier chat turns, no instruction)

And `--per-workload 6 --variants current,recorded-turn`, the base model's own answer to the top pair's question as an
earlier exchange before the question (so a paraphrase might be answered as the stored question was): paraphrased
1.40x -> 1.31x median oracle copy, unanswerable 1.12x -> 1.33x (measured 2026-12-01). Printed per question, one
paraphrase ("Can you explain what a black hole is?") went 1.46x -> 3.74x, the other five were answered afresh much
as before; none of the 12 was retrieved confidently. Not a lever for SmolLM2-135M either.

A 135M model hardly follows "repeat the reference": every wording leaves ~70-80% of a paraphrase's answer in its
own words, and no variant lifts even the oracle copy bound near 2x, so kvdb keeps ``ref-v1`` (a change of format
would also void every recorded answer and trained draft). Worth re-running for a larger base model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvdb.prompt as prompt_mod  # noqa: E402
from benchmarks.copy_ceiling import oracle_copy  # noqa: E402
from kvdb.answer import Answerer  # noqa: E402
from kvdb.bench import default_questions  # noqa: E402
from kvdb.decode import greedy_generate  # noqa: E402
from kvdb.runtime import Runtime  # noqa: E402
from kvdb.sources import CopySource  # noqa: E402

VARIANTS = {
    "current": prompt_mod.INSTRUCTION,
    "faq": ("You answer questions from a FAQ. If a reference below answers the user's question, reply with its "
            "answer word for word. Otherwise answer briefly on your own."),
    "grounded": ("Answer the user's question using the reference below. When the reference answers it, repeat the "
                 "reference answer exactly."),
    "prefer": ("Answer the user's question. When a reference below answers it, give that reference's answer as it "
               "is written; use your own words only when none does."),
}


BUILD_MESSAGES = prompt_mod.build_messages


def history_messages(question, references):
    """References as earlier turns of the conversation (the top one last), the question as the next user turn."""
    messages = [{"role": "system", "content": "Answer the user's question."}]
    for r in reversed(list(references)):
        messages += [{"role": "user", "content": r.question}, {"role": "assistant", "content": r.answer}]
    return messages + [{"role": "user", "content": question}]


LAYOUTS = {"history": history_messages}
# The current format plus the base model's own answer to the top pair's question as an earlier exchange (needs that
# answer, so it is built in main rather than by a build_messages stand-in).
RECORDED_TURN = "recorded-turn"


def from_reference(answer: list[int], reference: list[int], n: int = 3) -> float:
    """Share of answer tokens inside an n-gram that also occurs in ``reference``."""
    grams = {tuple(reference[i:i + n]) for i in range(len(reference) - n + 1)}
    hit = [False] * len(answer)
    for i in range(len(answer) - n + 1):
        if tuple(answer[i:i + n]) in grams:
            for j in range(i, i + n):
                hit[j] = True
    return sum(hit) / len(answer) if answer else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=None)
    ap.add_argument("--per-workload", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--variants", default=",".join([*VARIANTS, *LAYOUTS, RECORDED_TURN]))
    ap.add_argument("--show", type=int, default=3, help="answers to print per variant and workload")
    args = ap.parse_args()
    rt = Runtime.open(args.home)
    answerer = Answerer(rt, use_draft=False)
    lm = answerer.lm
    costs = answerer.pass_costs()
    questions = [q for q in default_questions(rt, args.per_workload) if q.workload != "stored"]
    summary = {}
    for name in args.variants.split(","):
        if name in LAYOUTS:
            prompt_mod.INSTRUCTION, prompt_mod.build_messages = VARIANTS["current"], LAYOUTS[name]
        else:
            prompt_mod.INSTRUCTION = VARIANTS["current" if name == RECORDED_TURN else name]
            prompt_mod.build_messages = BUILD_MESSAGES
        rows: dict[str, list[tuple[float, float, int]]] = {}
        shown: dict[str, int] = {}
        for q in questions:
            result, ids, n = answerer.prepare(q.query, args.max_new_tokens)
            turned = name == RECORDED_TURN and bool(result.matches)  # answered below, under the longer prompt
            answer = [] if turned else greedy_generate(lm.model, ids, n, lm.eos_ids).output_ids
            copies = [lm.encode(m.answer) for m in result.matches]
            if result.matches:  # the recorded answer to the top pair's own question, under this instruction
                top = result.matches[0]
                _, own_ids, _ = answerer.prepare(top.question, args.max_new_tokens)
                own = greedy_generate(lm.model, own_ids, n, lm.eos_ids).output_ids
                copies.append(own)
                if turned:
                    messages = BUILD_MESSAGES(q.query, [prompt_mod.Reference(m.question, m.answer)
                                                        for m in result.matches])
                    turn = [{"role": "user", "content": top.question},
                            {"role": "assistant", "content": lm.decode([t for t in own if t not in lm.eos_ids])}]
                    ids = lm.chat_ids(messages[:1] + turn + messages[1:], add_generation_prompt=True)
                    answer = greedy_generate(lm.model, ids, n, lm.eos_ids).output_ids
            speed, _ = oracle_copy(CopySource(copies, search_context=True), ids, answer, costs)
            grounded = from_reference(answer, copies[0]) if copies else 0.0
            rows.setdefault(q.workload, []).append((speed, grounded, len(answer)))
            if shown.get(q.workload, 0) < args.show:
                shown[q.workload] = shown.get(q.workload, 0) + 1
                print(f"[{name}/{q.workload}] {q.query}\n  -> {lm.decode(answer)[:300]!r}", flush=True)
        for workload, values in rows.items():
            summary[(name, workload)] = {
                "oracle_copy_speedup_median": round(statistics.median(v[0] for v in values), 3),
                "from_top_reference_mean": round(statistics.mean(v[1] for v in values), 3),
                "answer_tokens_mean": round(statistics.mean(v[2] for v in values), 1),
                "questions": len(values)}
            print(f"== {name:9s} {workload:12s} {json.dumps(summary[(name, workload)])}", flush=True)
    print("\nsummary")
    for (name, workload), s in summary.items():
        print(f"{name:9s} {workload:12s} {json.dumps(s)}")


if __name__ == "__main__":
    main()
