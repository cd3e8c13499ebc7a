"""A throwaway PostgreSQL server for the tests: initdb into a temporary folder, start it on loopback on a free port
(fsync off), hand out one fresh database per test, stop it and delete the folder at the end.

initdb and postgres refuse to run as root; as root they run as the ``postgres`` user (``runuser``) in a folder it
owns. A detached watchdog stops the server if the test process dies without its teardown.
``scripts/postgres.sh install`` (run by ``make test``) installs Debian's package where the binaries are missing.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

USER = "kvdb"


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: Debian's newest /usr/lib/postgresql/<v>/bin, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def why_unavailable() -> str | None:
    """None when a server can be started here, else the reason."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'kvdb[postgres]')"
    bindir = find_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        return "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH); " \
               "run `scripts/postgres.sh install`"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser: PostgreSQL refuses to run as root"
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="kvdb-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        self.started = False

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def start(self) -> "PgServer":
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)
        done = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8",
                         "--locale=C")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr[-1000:]}")
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr[-800:]} {log}")
        self.started = True
        self._watchdog()
        return self

    def _watchdog(self) -> None:
        """A detached shell that stops the server and removes its folder once this process is gone, however it
        ended (a killed test run skips fixture teardown and atexit); it exits by itself after a normal ``stop``."""
        stop = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]
        if self.as_root:
            stop = ["runuser", "-u", "postgres", "--", *stop]
        script = (f"while kill -0 {os.getpid()} 2>/dev/null && [ -d {shlex.quote(str(self.data))} ]; do sleep 1; "
                  f"done; if [ -d {shlex.quote(str(self.data))} ]; then {shlex.join(stop)} >/dev/null 2>&1; "
                  f"rm -rf {shlex.quote(str(self.root))}; fi")
        subprocess.Popen(["sh", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        try:
            if self.started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres", autocommit=True) as c:
            c.execute(sql)

    def create_database(self, prefix: str = "kvdb_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def execute(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        """Run one statement straight through psycopg (independent of the code under test)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname=database, autocommit=True) as c:
            cur = c.execute(sql, params)
            return cur.fetchall() if cur.description else []
