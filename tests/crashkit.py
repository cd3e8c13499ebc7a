"""The crash harness behind tests/test_crash.py and benchmarks/crash_harness.py.

It runs `python -m kvdb add --file`, `build`, `export` and `train --epochs 1` as subprocesses on a tiny-model home
and SIGKILLs them at seeded random moments (uniform over the last three quarters of the command's measured run time;
the first quarter is mostly imports). After every kill it checks, reading SQLite and the files directly:

* ``PRAGMA integrity_check`` is ok;
* every pair of every file whose add finished is present exactly once, the killed file's pairs are all there or
  none is, and no pair appears that nobody added;
* every vectors and embedding blob matches its sha256 and its recorded token count (no half-written vectors);
* every export and checkpoint file loads (``weights_only``) and is either the old file (same bytes) or a complete
  new one;
* after a query's index refresh (``Retriever.index()``), the index covers exactly the pairs with embeddings at the
  store's revision.

A killed add is rerun at once and must finish with all its pairs; the other commands are attempted again until the
planned kills are done, and a last, unkilled run must finish. At the end `kvdb doctor --repair` removes what the kills
left (temporary files) and `kvdb doctor` must then find the home clean.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.reliability import (REPO, bad_blobs, integrity, kvdb_cmd, kvdb_env, pair_file, pair_hashes, store_view,
                               index_pair_ids)

# Time a command is expected to take before any run of it was measured (tiny model, 2 busy cores).
PRIOR_SECONDS = {"add": 1.0, "build": 6.0, "export": 2.5, "train": 7.0}
BULK_PAIRS = 300  # pairs per killed `add --file`: enough that a kill can land inside the insert
BUILD_PAIRS = 6  # pairs added (and built, exported, trained on) per build attempt


@dataclass
class Outcome:
    killed: bool
    rc: int | None
    seconds: float
    stderr: str


@dataclass
class Tally:
    tried: int = 0
    survived: int = 0
    by_command: dict[str, list[int]] = field(default_factory=dict)  # name -> [tried, survived]
    effects: dict[str, int] = field(default_factory=dict)  # what the killed runs had done, e.g. "add: none stored"
    failures: list[str] = field(default_factory=list)
    reruns: int = 0
    seconds: float = 0.0
    check_seconds: float = 0.0  # of ``seconds``, spent checking

    def summary(self) -> str:
        per = ", ".join(f"{k} {s}/{t}" for k, (t, s) in self.by_command.items())
        eff = ", ".join(f"{k}: {n}" for k, n in sorted(self.effects.items()))
        return (f"kills survived {self.survived}/{self.tried} ({per}); reruns completed {self.reruns}; "
                f"{self.seconds:.0f}s ({self.check_seconds:.0f}s checking); effects of the kills: {eff}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Harness:
    def __init__(self, root: Path, config: Path, seed: int = 0, log: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.home = self.root / "home"
        self.config = Path(config)
        self.rng = random.Random(seed)
        self.log = log or (lambda line: None)
        self.est = dict(PRIOR_SECONDS)
        self.expected: set[str] = set()  # pairs of files whose add finished
        self.submitted: set[str] = set()  # pairs of every file ever given to add
        self.tally = Tally()
        self._files = 0

    # -- running ------------------------------------------------------------------------------------------------
    def attempt(self, name: str, args: list[str], kill_at: float | None) -> Outcome:
        with tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(kvdb_cmd(*args), env=kvdb_env(self.home, self.config), cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            killed = False
            try:
                proc.wait(timeout=kill_at if kill_at is not None else 600)
            except subprocess.TimeoutExpired:
                if kill_at is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
            seconds = time.monotonic() - t0
            err.seek(0)
            stderr = err.read().decode("utf-8", "replace")
        if not killed and proc.returncode == 0:
            self.est[name] = seconds
        return Outcome(killed, proc.returncode, seconds, stderr)

    def kill_time(self, name: str) -> float:
        return self.rng.uniform(0.25, 1.0) * self.est[name]

    def new_file(self, tag: str, n: int, domain: str) -> tuple[Path, list[str]]:
        self._files += 1
        path, hashes = pair_file(self.root, f"{tag}{self._files}", n, domain)
        self.submitted.update(hashes)
        return path, hashes

    def add_completed(self, path: Path, hashes: list[str]) -> bool:
        out = self.attempt("add", ["add", "--file", str(path)], None)
        if out.rc != 0:
            self.fail(f"add --file {path.name} did not complete after a kill (rc {out.rc}): {out.stderr[-400:]}")
            return False
        self.expected.update(hashes)
        return True

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def fail(self, why: str) -> None:
        self.tally.failures.append(why)
        self.log(f"FAIL {why}")

    def effect(self, label: str) -> None:
        self.tally.effects[label] = self.tally.effects.get(label, 0) + 1

    def record_kill(self, name: str, ok: bool) -> None:
        self.tally.tried += 1
        self.tally.survived += ok
        t = self.tally.by_command.setdefault(name, [0, 0])
        t[0] += 1
        t[1] += ok

    def files_snapshot(self) -> dict[Path, str]:
        out = {}
        for folder in (self.home / "knowledge_cache", self.home / "checkpoints"):
            if folder.is_dir():
                out.update({p: _sha(p) for p in folder.rglob("*.pth")})
        return out

    # -- the checks -----------------------------------------------------------------------------------------------
    def verify(self, context: str, before: dict[Path, str] | None = None,
               killed_file: list[str] | None = None) -> bool:
        t0 = time.monotonic()
        try:
            return self._verify(context, before, killed_file)
        finally:
            self.tally.check_seconds += time.monotonic() - t0

    def _verify(self, context: str, before: dict[Path, str] | None, killed_file: list[str] | None) -> bool:
        n_fail = len(self.tally.failures)
        if not (self.home / "kvdb.sqlite").exists():
            if self.expected:
                self.fail(f"{context}: the store file is gone")
            return len(self.tally.failures) == n_fail
        result = integrity(self.home)
        if result != "ok":
            self.fail(f"{context}: integrity_check says {result}")
        hashes = pair_hashes(self.home)
        present = set(hashes)
        if len(hashes) != len(present):
            self.fail(f"{context}: {len(hashes) - len(present)} duplicate pair(s)")
        if self.expected - present:
            self.fail(f"{context}: {len(self.expected - present)} pair(s) added before the kill are missing")
        if present - self.submitted:
            self.fail(f"{context}: {len(present - self.submitted)} pair(s) nobody added")
        if killed_file is not None:
            got = len(present & set(killed_file))
            if got not in (0, len(killed_file)):
                self.fail(f"{context}: {got} of the killed file's {len(killed_file)} pairs are stored (half a file)")
            self.effect("add: file stored whole" if got else "add: nothing stored")
        bad = bad_blobs(self.home)
        if bad:
            self.fail(f"{context}: blobs fail their checksum or length: {bad[:5]}")
        self._verify_files(context, before or {}, present)
        self._verify_index(context)
        return len(self.tally.failures) == n_fail

    def _verify_files(self, context: str, before: dict[Path, str], present: set[str]) -> None:
        from kvdb.draft import read_checkpoint
        from kvdb.errors import KvdbError
        from kvdb.export import load_cache

        now = self.files_snapshot()
        for path in before:
            if path not in now:
                self.fail(f"{context}: {path.name} disappeared")
        for path, sha in now.items():
            is_export = path.parent == self.home / "knowledge_cache"
            try:
                obj = load_cache(path) if is_export else read_checkpoint(path)
            except KvdbError as exc:
                self.fail(f"{context}: {path.name} does not load: {exc}")
                continue
            if is_export:
                stale = {q["hash"] for q in obj["qa_pairs"]} - present
                if stale:
                    self.fail(f"{context}: {path.name} holds {len(stale)} pair(s) the store never had")
            if path in before and before[path] != sha:
                self.effect(f"{'export' if is_export else 'train'}: a file was replaced whole")

    def _verify_index(self, context: str) -> None:
        from kvdb.retrieve import Retriever
        from kvdb.runtime import Runtime

        _, live = store_view(self.home)
        if not live:
            return
        rt = Runtime.open(self.home, self.config)
        try:
            Retriever(rt.config, rt.home, rt.store).index()  # what a query does before it searches
        finally:
            rt.store.dispose()
        found = index_pair_ids(self.home)
        revision, live = store_view(self.home)
        if found is None:
            self.fail(f"{context}: no index after a query")
            return
        meta, covered = found
        if meta.get("revision") != revision or covered != live:
            self.fail(f"{context}: the index (revision {meta.get('revision')}, {len(covered)} pairs) disagrees with "
                      f"the store (revision {revision}, {len(live)} pairs with embeddings)")

    # -- chains of kills --------------------------------------------------------------------------------------------
    def add_chain(self, kills: int) -> None:
        for _ in range(kills * 4):
            if kills <= 0:
                return
            path, hashes = self.new_file("bulk", BULK_PAIRS, "bulk")
            at = self.kill_time("add")
            out = self.attempt("add", ["add", "--file", str(path)], at)
            if not out.killed:
                if out.rc != 0:
                    self.fail(f"add --file {path.name} failed (rc {out.rc}): {out.stderr[-400:]}")
                else:
                    self.expected.update(hashes)
                continue
            kills -= 1
            ok = self.verify(f"add killed at {at:.2f}s", killed_file=hashes)
            ok = self.add_completed(path, hashes) and ok
            self.tally.reruns += 1
            ok = self.verify("add rerun") and ok
            self.record_kill("add", ok)
            self.log(f"add killed at {at:.2f}s: {'ok' if ok else 'FAILED'}")

    def command_chain(self, name: str, args: list[str], kills: int,
                      before_attempt: Callable[[], None] | None = None) -> None:
        for _ in range(kills * 4):
            if kills <= 0:
                break
            if before_attempt is not None:
                before_attempt()
            before = self.files_snapshot()
            rows_before = self._counts()
            at = self.kill_time(name)
            out = self.attempt(name, args, at)
            if not out.killed:
                if out.rc != 0:
                    self.fail(f"{name} failed (rc {out.rc}): {out.stderr[-400:]}")
                continue
            kills -= 1
            ok = self.verify(f"{name} killed at {at:.2f}s", before=before)
            if self._counts() != rows_before:
                self.effect(f"{name}: rows committed before the kill")
            self.record_kill(name, ok)
            self.log(f"{name} killed at {at:.2f}s of ~{self.est[name]:.1f}s: {'ok' if ok else 'FAILED'}")
        if before_attempt is not None:
            before_attempt()
        before = self.files_snapshot()
        out = self.attempt(name, args, None)
        self.tally.reruns += 1
        if out.rc != 0:
            self.fail(f"{name} rerun after the kills did not complete (rc {out.rc}): {out.stderr[-600:]}")
        self.verify(f"{name} rerun", before=before)

    def _counts(self) -> tuple[int, int, int]:
        from tests.reliability import db

        with db(self.home) as conn:
            try:
                return tuple(conn.execute(f"select count(*) from {t}").fetchone()[0]
                             for t in ("pair_vectors", "embeddings", "base_answers"))
            except Exception:
                return (0, 0, 0)

    def pending_build_work(self, domain: str) -> None:
        """Add a small file of pairs to build (the build chain's domain), so each build attempt has work."""
        path, hashes = self.new_file("built", BUILD_PAIRS, domain)
        if not self.add_completed(path, hashes):
            raise RuntimeError("could not add pairs to build")

    # -- a whole run ------------------------------------------------------------------------------------------------
    def run(self, rounds: int = 1, add: int = 5, build: int = 3, export: int = 3, train: int = 2) -> Tally:
        t0 = time.monotonic()
        for r in range(rounds):
            self.add_chain(add)
            # Pairs to build come in small files of one domain per round; the bulk files (domain "bulk") stay
            # unbuilt, so that a build attempt has a few pairs to do, not thousands.
            domain = ["physics", "biology", "math", "history"][r % 4]
            self.command_chain("build", ["build", "--domain", domain], build,
                               before_attempt=self._build_work_for(domain))
            self.command_chain("export", ["export"], export)
            if train:
                self.command_chain("train", ["train", "--epochs", "1"], train)
        self.finish()
        self.tally.seconds = time.monotonic() - t0
        return self.tally

    def _build_work_for(self, domain: str) -> Callable[[], None]:
        def work() -> None:
            from tests.reliability import db

            with db(self.home) as conn:
                pending = conn.execute(
                    "select count(*) from pairs p join domains d on d.id = p.domain_id where d.name = ? and not "
                    "exists (select 1 from pair_vectors v where v.pair_hash = p.hash)", (domain,)).fetchone()[0]
            if pending < 2:
                self.pending_build_work(domain)
        return work

    def finish(self) -> None:
        """`kvdb doctor --repair` clears what the kills left; `kvdb doctor` must then be clean."""
        from kvdb.doctor import check
        from kvdb.runtime import Runtime

        rt = Runtime.open(self.home, self.config)
        repaired = check(rt, repair=True, temp_min_age_s=0)
        for f in repaired.findings:
            if f.status != "ok":
                self.effect(f"doctor --repair: {f.check} {f.status}")
        report = check(Runtime.open(self.home, self.config), temp_min_age_s=0)
        for f in report.problems:
            self.fail(f"doctor after the run: {f.check}: {f.detail}")
