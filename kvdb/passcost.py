"""What a verify pass costs on this machine, and which kernel to run it with: the table DraftPolicy prices drafts by.

A pass over q tokens costs less than q one-token steps but more than one, and not monotonically in q (BLAS picks
other kernels for other shapes). ``measure_pass_plan`` times passes of 1..max_q tokens through the engine's own
``verify`` after a fixed context and reports each relative to a one-token pass. Where the engine offers a second
kernel for short passes (``transposed_rows``: the transformers engine's ``(W @ x^T)^T`` product, kvdb.kernels),
the plan also says for which lengths that kernel is faster: which one wins depends on the BLAS and the processor,
so it is measured, never assumed.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from kvdb.engines import Engine, as_engine


@dataclass(frozen=True)
class PassPlan:
    """This machine's verify passes: ``costs[q - 1]`` is the time of a pass over q tokens relative to a plain
    one-token step (DraftPolicy.pass_costs), with the faster kernel for that length; ``transposed_rows`` are the
    lengths run as ``(W @ x^T)^T`` (the transformers engine's ``transposed_rows``), which won there."""

    costs: list[float]
    transposed_rows: frozenset[int] = frozenset()


@contextlib.contextmanager
def _kernel(engine: Engine, rows: Collection[int]) -> Iterator[None]:
    """Within the block, the engine runs passes of exactly these lengths with its second kernel (engines without
    one: a no-op)."""
    if not hasattr(engine, "transposed_rows"):
        yield
        return
    before = engine.transposed_rows
    engine.transposed_rows = frozenset(rows)
    try:
        yield
    finally:
        engine.transposed_rows = before


def measure_pass_plan(engine, max_q: int = 33, context: int = 256, reps: int = 5,
                      try_transposed: bool = True) -> PassPlan:
    """Time one verify pass over q = 1..max_q new tokens after ``context`` tokens with the stock kernel and (where
    the engine has one and ``try_transposed``) the transposed product, relative to the stock one-token pass that
    plain greedy decoding runs. ``engine``: an Engine, or a Hugging Face model (wrapped).

    ``reps`` rounds over every q and kernel, the median per (q, kernel): interleaving spreads other work on the
    machine over all of them alike, and the median does not reward one lucky run. The transposed kernel is swept
    only where a probe of 2, 4 and 8 inputs finds it 10% faster somewhere, and a length takes it only where it wins
    by 3%: near equal, the stock kernel is the one generate's own passes share."""
    engine = as_engine(engine)
    rng = random.Random(0)
    context = max(1, min(context, engine.max_positions - max_q))
    engine.prefill([rng.randrange(engine.vocab_size) for _ in range(context)])
    probe = [rng.randrange(engine.vocab_size) for _ in range(max_q)]

    def once(q: int) -> float:
        t0 = time.perf_counter()
        engine.verify(probe[:q])  # returns host ints: the pass has finished
        seconds = time.perf_counter() - t0
        engine.rollback(context)
        return seconds

    lengths = range(1, max_q + 1)
    try_transposed = try_transposed and max_q >= 2 and hasattr(engine, "transposed_rows")
    if try_transposed:
        try_transposed = _transposed_worth_sweeping(engine, once, max_q)
    transposed = range(2, max_q + 1) if try_transposed else range(0)
    stock_runs: list[list[float]] = []
    transposed_runs: list[list[float]] = []
    for rep in range(reps + 1):  # round 0 warms both kernels up
        with _kernel(engine, ()):
            stock = [once(q) for q in lengths]
        with _kernel(engine, transposed):
            other = [once(q) for q in transposed]
        if rep:
            stock_runs.append(stock)
            transposed_runs.append(other)
    stock_t = [statistics.median(times) for times in zip(*stock_runs)]
    other_t = [statistics.median(times) for times in zip(*transposed_runs)] if transposed else []
    return _plan(stock_t, other_t)


def _transposed_worth_sweeping(engine: Engine, once, max_q: int) -> bool:
    """A short probe: where the stock kernel is as fast (common), a full sweep of the second would double the
    measurement for nothing."""
    few = sorted({q for q in (2, 4, 8) if q <= max_q})
    with _kernel(engine, few):
        for q in few:  # warm-up
            once(q)
        probe_alt = [min(once(q) for _ in range(2)) for q in few]
    with _kernel(engine, ()):
        probe_stock = [min(once(q) for _ in range(2)) for q in few]
    return any(a < 0.9 * s for a, s in zip(probe_alt, probe_stock))


def _plan(stock_t: list[float], other_t: list[float]) -> PassPlan:
    """Costs relative to the stock one-token pass; a length takes the transposed kernel where it wins by 3%."""
    unit = stock_t[0]
    costs, chosen = [1.0], set()
    for q in range(2, len(stock_t) + 1):
        t = stock_t[q - 1]
        if other_t and other_t[q - 2] < 0.97 * t:
            t = other_t[q - 2]
            chosen.add(q)
        costs.append(round(t / unit, 4))
    return PassPlan(costs, frozenset(chosen))


def measure_pass_costs(engine, max_q: int = 33, context: int = 256, reps: int = 5) -> list[float]:
    """``measure_pass_plan`` with the stock kernel only: the pass costs alone."""
    return measure_pass_plan(engine, max_q, context, reps, try_transposed=False).costs


__all__ = ["PassPlan", "measure_pass_costs", "measure_pass_plan"]
