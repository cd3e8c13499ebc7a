"""Worker processes for tests/test_concurrency.py and tests/test_postgres.py (KVDB_HOME, KVDB_CONFIG and
KVDB_DATABASE_URL come from the environment).

    python -m tests.workers ROLE OUT.json GO_FILE [ARG...]

Each worker imports everything, touches ``OUT.json.ready``, waits for ``GO_FILE`` (which holds the deadline as a
Unix time) so that all workers start together however slow their start-up was, works until the deadline, and writes
what every operation did to OUT.json:

* ``add FILE...``: `kvdb add --file` each file (through the click CLI), spread over the time given;
* ``build ARG...``: `kvdb build ARG...` again and again;
* ``query QUESTION...``: search the questions in turn, each time with a fresh Retriever (which reloads or rebuilds
  the index when the store moved on, as a new `kvdb query` process does); every fifth through `kvdb query`.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from click.testing import CliRunner

    from kvdb.cli import cli
    from kvdb.errors import KvdbError
    from kvdb.runtime import Runtime

    role, out, go, rest = argv[0], Path(argv[1]), Path(argv[2]), argv[3:]
    if role != "add":  # an adder needs no torch: it starts in a fraction of the time
        import torch

        from kvdb.retrieve import Retriever

        torch.set_num_threads(1)
    runner = CliRunner()
    ops: list[dict] = []

    def run(*args: str) -> dict:
        t0 = time.time()
        result = runner.invoke(cli, [*args, "--json"])
        op = {"cmd": args[0], "via": "cli", "rc": result.exit_code, "seconds": round(time.time() - t0, 3),
              "error": result.stderr[-400:] if result.exit_code else ""}
        if result.exit_code == 0:
            op["result"] = json.loads(result.stdout)
        elif result.exception is not None and not isinstance(result.exception, SystemExit):
            op["error"] += f" {type(result.exception).__name__}: {result.exception}"
        ops.append(op)
        return op

    rt = Runtime.open()
    embedder = None
    if role == "query":
        embedder = Retriever(rt.config, rt.home, rt.store).embedder()  # loaded before the start, once

    Path(f"{out}.ready").touch()
    while not go.exists():
        time.sleep(0.05)
    deadline = float(go.read_text())

    if role == "add":
        rng = random.Random(out.name)
        for i, path in enumerate(rest):
            # Spread the adds over the run so that they meet builds and queries, not just each other.
            start = time.time() + rng.uniform(0, max(0.0, deadline - time.time() - 1) / (len(rest) - i))
            time.sleep(max(0.0, start - time.time()))
            run("add", "--file", path)
    elif role == "build":
        while time.time() < deadline:
            op = run("build", *rest)
            if op["rc"] == 0 and not op["result"]["built"] and not op["result"]["embedded"]:
                time.sleep(0.2)  # nothing new yet
    elif role == "query":
        i = 0
        while time.time() < deadline:
            question = rest[i % len(rest)]
            if i % 5 == 0:
                run("query", "-k", "5", question)
            else:
                t0 = time.time()
                try:
                    retriever = Retriever(rt.config, rt.home, rt.store, embedder=embedder, rerank=False)
                    (res,) = retriever.search([question], k=5)
                    ops.append({"cmd": "query", "via": "library", "rc": 0, "seconds": round(time.time() - t0, 3),
                                "result": res.as_dict()})
                except KvdbError as exc:
                    ops.append({"cmd": "query", "via": "library", "rc": 1, "error": str(exc)})
                time.sleep(0.02)
            i += 1
    else:
        raise SystemExit(f"unknown role {role}")
    out.write_text(json.dumps(ops))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
