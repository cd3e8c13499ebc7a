"""How fast can copying alone make an answer? An oracle bound for `kvdb query --generate` without a learned draft.

For each question the base model's greedy answer is computed once; then decoding is replayed with the same copy
source kvdb uses (retrieved answers, recorded answers of the retrieved pairs, the context), but with an oracle
policy: at each step it takes the copy proposal (up to 16 tokens) only when at least one of its tokens would be
accepted, and otherwise does a plain step. Time is counted in plain-step units from this machine's measured pass
costs (kvdb.passcost.measure_pass_costs). No real policy can beat this bound, which says how much of an answer copying
can cover at all.

Beside it, the real DraftPolicy replayed on the same answer with the same sources (copies, no learned draft) and the
same table: what kvdb's choices cost without timing noise, so a policy change can be judged on 40 questions in a
minute rather than by wall-clock runs whose per-question ratios move 5-10% on a busy machine.

    .venv/bin/python benchmarks/copy_ceiling.py [--home var] [--per-workload 8] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvdb.answer import Answerer  # noqa: E402
from kvdb.bench import default_questions  # noqa: E402
from kvdb.decode import DecodeState, greedy_generate, select_draft  # noqa: E402
from kvdb.policy import DraftPolicy  # noqa: E402
from kvdb.runtime import Runtime  # noqa: E402
from kvdb.sources import CopySource  # noqa: E402
from kvdb.recorded import AnswerBook  # noqa: E402


def replay_policy(answerer: Answerer, book, query: str, result, ids: list[int], answer: list[int],
                  costs: list[float]) -> float:
    """Speedup over greedy in step units of kvdb's own policy choosing among the copy sources, verified against the
    known greedy ``answer`` (a pass over 1 + k tokens costs what the table says)."""
    sources = answerer.sources(ids, result, query, book, learned=False)
    policy = DraftPolicy(max_draft=answerer.rt.config.generation.max_draft_tokens, pass_costs=costs)
    vocab = answerer.lm.model.get_output_embeddings().weight.shape[0]
    state = DecodeState(ids, answer[:1], len(answer), frozenset(answerer.lm.eos_ids), vocab)
    policy.start(sources, answerer.lm.device)
    units = 0.0
    while len(state.output) < len(answer):
        used, draft = select_draft(state, sources, policy)
        at, m = len(state.output), 0
        while m < len(draft) and at + m < len(answer) and draft[m] == answer[at + m]:
            m += 1
        state.output = answer[: at + m + 1]
        policy.update(used, draft, m)
        units += policy.cost(len(draft))
    return (len(answer) - 1) / units if units else 1.0


def ceiling(answerer: Answerer, book, query: str, max_new_tokens: int,
            costs: list[float]) -> tuple[float, float, int, int]:
    """(oracle speedup over greedy in step units, the policy's, answer tokens, tokens copied)."""
    result, ids, n = answerer.prepare(query, max_new_tokens)
    answer = greedy_generate(answerer.lm.model, ids, n, answerer.lm.eos_ids).output_ids
    policy = replay_policy(answerer, book, query, result, ids, answer, costs)
    copy = next(s for s in answerer.sources(ids, result, query, book, learned=False) if isinstance(s, CopySource))
    speedup, copied = oracle_copy(copy, ids, answer, costs)
    return speedup, policy, len(answer), copied


def oracle_copy(copy: CopySource, ids: list[int], answer: list[int], costs: list[float]) -> tuple[float, int]:
    """(speedup over greedy in step units when the copy proposal is taken only where it helps, answer tokens
    copied)."""
    i, units, copied = 0, 0.0, 0
    while i < len(answer) - 1:
        proposal = copy.propose(ids + answer[: i + 1], 16)
        rest = answer[i + 1:]
        m = 0
        while m < len(proposal) and m < len(rest) and proposal[m] == rest[m]:
            m += 1
        if m:
            units += min(costs[len(proposal):] or [costs[-1]])  # the cheapest pass over >= 1 + k tokens
            copied += m
        else:
            units += 1.0
        i += m + 1
    return (len(answer) - 1) / units if units else 1.0, copied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=None)
    ap.add_argument("--per-workload", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    rt = Runtime.open(args.home)
    answerer = Answerer(rt, use_draft=False)
    costs = answerer.pass_costs()
    book = AnswerBook(rt, answerer.lm, args.max_new_tokens, replace_stored=False)
    questions = [q for q in default_questions(rt, args.per_workload) if q.workload != "stored"]
    by_workload: dict[str, list[tuple[float, float]]] = {}
    for q in questions:
        speedup, policy, tokens, copied = ceiling(answerer, book, q.query, args.max_new_tokens, costs)
        by_workload.setdefault(q.workload, []).append((speedup, policy))
        print(f"{q.workload:12s} oracle {speedup:5.2f}x  policy {policy:5.2f}x  {copied:3d}/{tokens:3d} tokens "
              f"copyable  {q.query[:60]}", flush=True)
    for workload, pairs in by_workload.items():
        for name, values in (("oracle", [o for o, _ in pairs]), ("policy", [p for _, p in pairs])):
            print(f"{workload}: {name} copy-only speedup median {statistics.median(values):.2f}x "
                  f"(min {min(values):.2f}x, max {max(values):.2f}x, {len(values)} questions)")


if __name__ == "__main__":
    main()
