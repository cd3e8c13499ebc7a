"""Crash harness, long run: SIGKILL `kvdb add --file`, `build`, `export` and `train` at seeded random moments on a
tiny-model home and check after every kill that nothing was lost or half-written (see tests/crashkit.py for the
checks). Prints "kills survived/kills tried" for the README's reliability section.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/crash_harness.py [--rounds 4] [--seed 0] [--json]

Each round does --add, --build, --export and --train kills (defaults 5, 3, 3, 2: 13 a round, 52 in four rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.crashkit import Harness  # noqa: E402
from tests.reliability import make_tiny_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--add", type=int, default=5)
    ap.add_argument("--build", type=int, default=3)
    ap.add_argument("--export", type=int, default=3)
    ap.add_argument("--train", type=int, default=2)
    ap.add_argument("--keep", help="Work in this folder and keep it (default: a temporary one).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kvdb-crash-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        config = make_tiny_config(root / "model")
        harness = Harness(root, config, seed=args.seed, log=None if args.json else print)
        tally = harness.run(rounds=args.rounds, add=args.add, build=args.build, export=args.export, train=args.train)
    if args.json:
        print(json.dumps({"kills_tried": tally.tried, "kills_survived": tally.survived,
                          "by_command": {k: {"tried": t, "survived": s} for k, (t, s) in tally.by_command.items()},
                          "reruns_completed": tally.reruns, "effects": tally.effects, "failures": tally.failures,
                          "seconds": round(tally.seconds, 1), "seed": args.seed}, indent=2))
    else:
        for failure in tally.failures:
            print(f"FAIL {failure}")
        print(tally.summary())
    return 0 if not tally.failures and tally.survived == tally.tried else 1


if __name__ == "__main__":
    sys.exit(main())
