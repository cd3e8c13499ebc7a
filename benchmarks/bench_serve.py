"""`kvdb serve` against in-process answers: served latency vs `kb.answer`, concurrent clients, memory.

Starts the real server (uvicorn, a subprocess) on a free loopback port over a built home, then in one run:
1. start-up: seconds until /health answers, and the first chat request's latency (models are warm: it loads nothing);
2. latency: p50 over N questions of a served, non-streaming answer (client wall time) against the in-process
   `kb.answer` on the same questions, after one untimed pass of each (so both replay the same recorded answers);
3. concurrency: C clients sending M requests in all: errors, answers identical to the sequential ones, throughput,
   p50/p99 latency;
4. memory: the server's RSS after request 50 and after the last one.

The server and this process each get ``--threads`` CPU threads (default: half the cores): two processes whose
OpenMP threads outnumber the cores slow each other down (a finished request's threads keep spinning), which made the
in-process side look up to 30x slower than the served one on 2 cores.

    .venv/bin/python benchmarks/bench_serve.py --home var --questions 20 --clients 8 --requests 200
    .venv/bin/python benchmarks/bench_serve.py --home /tmp/h --config tiny.yaml --requests 60 --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvdb  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_server(home: str, config: str | None, log: Path, threads: int) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "kvdb", "--home", home, *(["--config", config] if config else []), "serve",
           "--port", str(port)]
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"kvdb serve exited {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - start
        except httpx.TransportError:
            time.sleep(0.2)


def served(client: httpx.Client, url: str, question: str, max_tokens: int) -> tuple[str, float]:
    start = time.perf_counter()
    r = client.post(f"{url}/v1/chat/completions", timeout=600,
                    json={"model": "kvdb", "messages": [{"role": "user", "content": question}],
                          "max_tokens": max_tokens})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"], time.perf_counter() - start


def latency(kb, url: str, questions: list[str], max_tokens: int) -> dict:
    """p50 of served and in-process answers on the same questions (each already answered once, untimed, by both)."""
    with httpx.Client() as client:
        answers = {q: served(client, url, q, max_tokens)[0] for q in questions}  # records each answer
        for q in questions:
            kb.answer(q, max_new_tokens=max_tokens)
        local, remote = [], []
        for q in questions:  # interleaved, so that drift in the machine's load hits both alike
            start = time.perf_counter()
            kb.answer(q, max_new_tokens=max_tokens)
            local.append(time.perf_counter() - start)
            remote.append(served(client, url, q, max_tokens)[1])
    p50_local, p50_remote = statistics.median(local), statistics.median(remote)
    return {"questions": len(questions), "in_process_p50_s": round(p50_local, 4), "served_p50_s": round(p50_remote, 4),
            "served_over_in_process": round(p50_remote / p50_local, 3) if p50_local else None,
            "sequential_answers": answers}


def concurrency(url: str, pid: int, questions: list[str], expected: dict[str, str], clients: int, requests: int,
                max_tokens: int) -> dict:
    done, lock, rss = [0], threading.Lock(), {}
    local = threading.local()

    def one(i: int) -> tuple[bool, bool, float]:
        if not hasattr(local, "client"):
            local.client = httpx.Client()
        q = questions[i % len(questions)]
        try:
            text, seconds = served(local.client, url, q, max_tokens)
            ok, same = True, text == expected[q]
        except httpx.HTTPError:
            ok, same, seconds = False, False, 0.0
        with lock:
            done[0] += 1
            if done[0] == min(50, requests):
                rss["after_50"] = rss_bytes(pid)
        return ok, same, seconds

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    rss["after_last"] = rss_bytes(pid)
    seconds = [s for ok, _, s in results if ok]
    return {"clients": clients, "requests": requests, "errors": sum(not ok for ok, _, _ in results),
            "identical": sum(same for _, same, _ in results), "throughput_rps": round(requests / wall, 3),
            "p50_s": round(percentile(seconds, 0.5), 4) if seconds else None,
            "p99_s": round(percentile(seconds, 0.99), 4) if seconds else None,
            "rss_after_50_mb": round(rss.get("after_50", 0) / 2**20, 1),
            "rss_after_last_mb": round(rss["after_last"] / 2**20, 1),
            "rss_growth": round(rss["after_last"] / rss["after_50"] - 1, 4) if rss.get("after_50") else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=os.environ.get("KVDB_HOME", "var"), help="A built home [KVDB_HOME or var].")
    ap.add_argument("--config", default=os.environ.get("KVDB_CONFIG"), help="Config YAML [KVDB_CONFIG or default].")
    ap.add_argument("--questions", type=int, default=20, help="Questions for the latency comparison.")
    ap.add_argument("--clients", type=int, default=8, help="Concurrent clients.")
    ap.add_argument("--requests", type=int, default=200, help="Requests in all, across the clients.")
    ap.add_argument("--max-tokens", type=int, default=64, help="Answer length cap.")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="CPU threads for the server and for this process each [half the cores].")
    ap.add_argument("--save", type=Path, default=None, help="Also write the report here as JSON.")
    ap.add_argument("--json", action="store_true", help="Print JSON instead of a summary.")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    with kvdb.open(args.home, args.config) as kb:
        stored = [p["question"] for p in kb.list()]
        if not stored:
            raise SystemExit(f"{args.home} holds no pairs: add and build some first")
        questions = [stored[i % len(stored)] for i in range(args.questions)]
        kb.warm()
        log = Path(args.home) / "bench_serve.log"
        proc, url, startup = start_server(args.home, args.config, log, args.threads)
        try:
            with httpx.Client() as client:
                first = served(client, url, questions[0], args.max_tokens)[1]
            report = {"threads": args.threads, "startup_s": round(startup, 2), "first_request_s": round(first, 4)}
            lat = latency(kb, url, questions, args.max_tokens)
            expected = lat.pop("sequential_answers")
            report["latency"] = lat
            report["concurrency"] = concurrency(url, proc.pid, list(expected), expected, args.clients, args.requests,
                                                args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(30)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    lat, con = report["latency"], report["concurrency"]
    print(f"start-up {report['startup_s']}s; first request {report['first_request_s']}s")
    print(f"latency p50 over {lat['questions']} questions: served {lat['served_p50_s']}s, in-process "
          f"{lat['in_process_p50_s']}s ({lat['served_over_in_process']}x)")
    print(f"{con['clients']} clients x {con['requests']} requests: {con['errors']} errors, {con['identical']} identical, "
          f"{con['throughput_rps']} req/s, p50 {con['p50_s']}s, p99 {con['p99_s']}s")
    print(f"server RSS after request 50: {con['rss_after_50_mb']} MiB, after the last: {con['rss_after_last_mb']} MiB "
          f"({con['rss_growth']:+.2%})" if con["rss_growth"] is not None else "")


if __name__ == "__main__":
    try:
        main()
    except kvdb.KvdbError as exc:
        raise SystemExit(f"error: {exc}") from None
