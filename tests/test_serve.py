"""`kvdb serve` for real: uvicorn in a subprocess on a free loopback port, a tiny-model home, driven by the `openai`
client and httpx. Answers equal kb.answer and the CLI's; streams join to the same text; 8 clients at once; every bad
request is a 4xx in OpenAI's error shape; auth; a client that disconnects mid-stream frees the model."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import kvdb
from tests.conftest import Kvdb
from tests.test_api import doc_example
from tests.test_build_query import PAIRS, built_home, tiny_config  # noqa: F401  (fixtures)

KEY = "s3cret"
QUESTIONS = ["What is entropy?", "How do plants make sugar?", "Why is the sky blue?", "What is a prime number?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m kvdb serve` on a free loopback port; its output goes to a log file shown when it fails."""

    def __init__(self, home: Path, config: Path, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / f"server-{self.port}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # one thread, as the in-process tests
        env.pop("KVDB_API_KEY", None)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvdb", "--home", str(home), "--config", str(config), "serve",
                 "--port", str(self.port), *options], stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"kvdb serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"kvdb serve did not come up in {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=headers or {}, timeout=10).text
        return {f"{s.name}{sorted(s.labels.items()) if s.labels else ''}": s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def served_home(tmp_path_factory, built_home) -> Path:  # noqa: F811
    home = tmp_path_factory.mktemp("served") / "home"
    shutil.copytree(built_home, home)
    return home


@pytest.fixture(scope="module")
def server(served_home, tiny_config):  # noqa: F811
    proc = ServerProcess(served_home, tiny_config)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def keyed_server(served_home, tiny_config):  # noqa: F811
    proc = ServerProcess(served_home, tiny_config, "--api-key", KEY)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def kb(served_home, tiny_config):  # noqa: F811
    with kvdb.open(served_home, tiny_config) as kb:
        yield kb


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, q: str, n: int = 16, **kw):
    return client.chat.completions.create(model="kvdb", messages=[{"role": "user", "content": q}], max_tokens=n, **kw)


def test_health_and_models(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["kvdb"]


def test_answers_equal_kb_and_cli(server, client, kb, served_home, tiny_config):  # noqa: F811
    cli = Kvdb(served_home, tiny_config)
    for q in QUESTIONS[:3]:
        reply = ask(client, q, 16)
        mine = kb.answer(q, max_new_tokens=16)
        theirs = cli.json("query", "--generate", "-n", "16", q)
        extra = reply.model_extra["kvdb"]
        assert reply.choices[0].message.content == mine.text == theirs["answer"]
        assert extra["output_ids"] == mine.output_ids == theirs["output_ids"]
        assert extra["matches"] == theirs["matches"] and extra["confident"] == theirs["confident"]
        assert set(extra["stats"]) >= {"seconds", "new_tokens", "verify_steps", "drafted", "accepted"}
        assert reply.usage.completion_tokens == len(mine.output_ids)
        assert reply.usage.prompt_tokens == len(mine.prompt_ids)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.model == "kvdb"
    short = ask(client, QUESTIONS[0], 3, extra_body={"top_k": 1})
    assert short.usage.completion_tokens <= 3 and short.choices[0].finish_reason == "length"
    assert short.model_extra["kvdb"]["output_ids"] == kb.answer(QUESTIONS[0], 3, top_k=1).output_ids
    same = client.chat.completions.create(model="kvdb", max_completion_tokens=16, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]}])
    assert same.choices[0].message.content == kb.answer(QUESTIONS[1], max_new_tokens=16).text


def test_stream_chunks_join_to_the_same_text(server, client, kb):
    for q in QUESTIONS[:2]:
        chunks = list(ask(client, q, 24, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == kb.answer(q, max_new_tokens=24).text
        assert chunks[0].choices[0].delta.role == "assistant"
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finals) == 1 and finals[0].model_extra["kvdb"]["stats"]["new_tokens"] >= 1
        assert chunks[-1].usage.completion_tokens == len(kb.answer(q, max_new_tokens=24).output_ids)
    body = {"messages": [{"role": "user", "content": QUESTIONS[2]}], "max_tokens": 12, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert {o["object"] for o in objs} == {"chat.completion.chunk"}
    assert "".join(o["choices"][0]["delta"].get("content", "") for o in objs) == \
        kb.answer(QUESTIONS[2], max_new_tokens=12).text


def test_the_documented_client_example_runs(keyed_server, kb):
    ns = {"server": keyed_server.url}
    exec(compile(doc_example("Serve it"), "docs/serving.md", "exec"), ns)
    assert ns["streamed"] == ns["reply"].choices[0].message.content == \
        kb.answer("How do B-trees stay balanced?", max_new_tokens=64).text


def test_eight_concurrent_clients(server, client, kb):
    alone = {q: kb.answer(q, max_new_tokens=16).text for q in QUESTIONS}
    jobs = [(QUESTIONS[i % len(QUESTIONS)], i % 2 == 1) for i in range(24)]

    def run(job):
        q, stream = job
        if stream:
            return q, "".join(c.choices[0].delta.content or "" for c in ask(client, q, 16, stream=True) if c.choices)
        return q, ask(client, q, 16).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    assert len(results) == len(jobs) and all(text == alone[q] for q, text in results)
    assert server.metrics()["kvdb_answers_in_flight"] == 0


def _chat(**fields) -> dict:
    return {"model": "kvdb", "messages": [{"role": "user", "content": "What is entropy?"}], **fields}


BAD_REQUESTS = [  # (method, path, body or raw bytes, status, words the message must contain)
    ("POST", "/v1/chat/completions", b'{"messages": [', 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, "body"),
    ("POST", "/v1/chat/completions", {"model": "kvdb"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": "What is entropy?"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "system", "content": "Hi"}]}, 400, "user message"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, 400, "empty"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "empty"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("POST", "/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens"),
    ("POST", "/v1/chat/completions", _chat(max_tokens=5000), 400, "max_tokens"),
    ("POST", "/v1/chat/completions", _chat(max_tokens="5"), 400, "max_tokens"),
    ("POST", "/v1/chat/completions", _chat(max_completion_tokens=-1), 400, "max_completion_tokens"),
    ("POST", "/v1/chat/completions", _chat(stream="yes"), 400, "stream"),
    ("POST", "/v1/chat/completions", _chat(temperature=0.7), 400, "sampling"),
    ("POST", "/v1/chat/completions", _chat(temperature="hot"), 400, "temperature"),
    ("POST", "/v1/chat/completions", _chat(n=2), 400, "n > 1"),
    ("POST", "/v1/chat/completions", _chat(stop=["\n"]), 400, "stop"),
    ("POST", "/v1/chat/completions", _chat(model="gpt-4o"), 404, "does not exist"),
    ("POST", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "word " * 1900}], max_tokens=2000),
     400, "exceeds the model's context"),
    ("POST", "/v1/chat/completions", _chat(stream=True, max_tokens=2000,
                                           messages=[{"role": "user", "content": "word " * 1900}]),
     400, "exceeds the model's context"),
    ("POST", "/v1/chat/completions", _chat(domain="nope"), 404, "no domain named"),
    ("POST", "/v1/query", {"top_k": 3}, 400, "query"),
    ("POST", "/v1/query", {"query": "What is entropy?", "top_k": 0}, 400, "top_k"),
    ("POST", "/v1/query", {"query": ""}, 400, "empty"),
    ("POST", "/v1/query", {"query": "x", "colour": "red"}, 400, "colour"),
    ("POST", "/v1/pairs", {"question": "What is a heap?", "answer": "A priority queue."}, 400, "no domain"),
    ("POST", "/v1/pairs", [{"question": "Q?", "answer": "A.", "domain": "cs"}, {"question": "Q2?", "domain": "cs"}],
     400, "record 2"),
    ("POST", "/v1/pairs", {"question": 5, "answer": "A.", "domain": "cs"}, 400, "question"),
    ("POST", "/v1/pairs", "just text", 400, "body"),
    ("DELETE", "/v1/pairs/abc", None, 400, "full 64-character hash"),
    ("DELETE", "/v1/pairs/" + "f" * 64, None, 404, "no pair"),
    ("GET", "/v1/pairs/" + "0" * 64, None, 404, "no pair"),
    ("GET", "/v1/pairs?domain=nope", None, 404, "no domain named"),
    ("POST", "/v1/build", {"domain": "all", "rebuild": "yes"}, 400, "rebuild"),
    ("GET", "/v1/nothing", None, 404, "Not Found"),
    ("GET", "/v1/chat/completions", None, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("method,path,body,status,needle", BAD_REQUESTS,
                         ids=[f"{i}-{m}-{p[:24]}" for i, (m, p, *_rest) in enumerate(BAD_REQUESTS)])
def test_bad_requests_are_4xx_in_openai_shape(server, method, path, body, status, needle):
    count = len(httpx.get(f"{server.url}/v1/pairs").json()["data"])
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        ({"json": body} if body is not None else {})
    r = httpx.request(method, f"{server.url}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code"} and needle in error["message"], error
    assert "Traceback" not in r.text
    assert len(httpx.get(f"{server.url}/v1/pairs").json()["data"]) == count  # nothing was written


def test_body_over_the_limit_is_refused(server):
    big = {"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=big, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks():  # no content-length: the cap counts the bytes as they arrive
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 65536
        yield b'"}]}'

    r = httpx.post(f"{server.url}/v1/pairs", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_sampling_is_refused_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="sampling"):
        ask(client, "What is entropy?", 8, temperature=0.8)


def test_query_pairs_and_build(server, kb):
    for q in QUESTIONS[:2]:
        body = {"query": q, "top_k": 2}
        assert httpx.post(f"{server.url}/v1/query", json=body).json() == kb.query(q, top_k=2).to_dict()
    listed = httpx.get(f"{server.url}/v1/pairs").json()
    assert listed["object"] == "list" and listed["data"] == kb.list()
    assert httpx.get(f"{server.url}/v1/pairs?domain=math").json()["data"] == kb.list("math")
    new = [{"question": "What is a heap?", "answer": "A tree-shaped priority queue.", "domain": "cs"},
           {"question": "What is a stack?", "answer": "A last-in, first-out list.", "domain": "cs", "source": "notes"}]
    added = httpx.post(f"{server.url}/v1/pairs", json=new).json()
    assert (added["added"], added["skipped"], len(added["hashes"])) == (2, 0, 2)
    again = httpx.post(f"{server.url}/v1/pairs", json=new[0]).json()
    assert (again["added"], again["skipped"]) == (0, 1)
    assert httpx.get(f"{server.url}/v1/pairs/{added['hashes'][1]}").json()["metadata"] == {"source": "notes"}
    conflict = httpx.post(f"{server.url}/v1/pairs", json={**new[0], "answer": "Memory for objects."})
    assert conflict.status_code == 409 and "replace" in conflict.json()["error"]["message"]
    built = httpx.post(f"{server.url}/v1/build", json={"domain": "all"}, timeout=300).json()
    assert built["built"] == 2 and built["indexed_pairs"] == len(PAIRS) + 2
    found = httpx.post(f"{server.url}/v1/query", json={"query": "What is a stack?", "top_k": 1}).json()
    assert found["matches"][0]["hash"] == added["hashes"][1]
    gone = httpx.delete(f"{server.url}/v1/pairs/{added['hashes'][0]}").json()
    assert gone == {"removed": 1, "hashes": [added["hashes"][0]]}
    assert httpx.delete(f"{server.url}/v1/pairs/{added['hashes'][1]}").json()["removed"] == 1
    assert len(httpx.get(f"{server.url}/v1/pairs").json()["data"]) == len(PAIRS)


def test_disconnect_mid_stream_frees_the_model(server, client, kb):
    """A long answer streams; meanwhile cheap endpoints answer, and a second client gives up while it waits for the
    model. Both leave: both answers stop (counted as cancelled) and the model serves the next client."""
    before = server.metrics()["kvdb_answers_cancelled_total"]
    body = {"messages": [{"role": "user", "content": "Tell me a long story about the sky and the sea."}],
            "max_tokens": 1700, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the first chunk arrived: the answer holds the model
        assert server.metrics()["kvdb_answers_in_flight"] == 1  # metrics answered while it runs
        assert httpx.get(f"{server.url}/v1/pairs").status_code == 200
        with pytest.raises(httpx.ReadTimeout):  # a second client waits for the model, then gives up
            httpx.post(f"{server.url}/v1/chat/completions", timeout=httpx.Timeout(60, read=0.3),
                       json={**body, "stream": False, "max_tokens": 64})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["kvdb_answers_in_flight"] == 0 and m["kvdb_answers_cancelled_total"] == before + 2:
            break
        time.sleep(0.2)
    assert m["kvdb_answers_in_flight"] == 0 and m["kvdb_answers_cancelled_total"] == before + 2
    reply = ask(client, QUESTIONS[3], 16)  # and the next client is served as before
    assert reply.choices[0].message.content == kb.answer(QUESTIONS[3], max_new_tokens=16).text


def test_metrics_parse_and_count(server, client):
    ask(client, QUESTIONS[0], 8)
    httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []})
    m = server.metrics()
    ok = "kvdb_requests_total[('endpoint', '/v1/chat/completions'), ('method', 'POST'), ('status', '200')]"
    bad = "kvdb_request_errors_total[('endpoint', '/v1/chat/completions'), ('status', '400')]"
    assert m[ok] >= 1 and m[bad] >= 1
    assert m["kvdb_generated_tokens_total"] >= 8 and m["kvdb_verify_steps_total"] >= 1
    assert m["kvdb_accepted_tokens_per_verify_step_count"] >= 1
    assert m["kvdb_request_seconds_count[('endpoint', '/v1/chat/completions')]"] >= 2


def test_auth(keyed_server):
    url = keyed_server.url
    assert httpx.get(f"{url}/health").status_code == 200  # health needs no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/pairs"),
                             ("POST", "/v1/chat/completions"), ("DELETE", "/v1/pairs/" + "f" * 64)):
            r = httpx.request(method, f"{url}{path}", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path)
    good = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/v1/models", headers=good).json()["data"][0]["id"] == "kvdb"
    assert "kvdb_requests_total" in httpx.get(f"{url}/metrics", headers=good).text
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(wrong, "What is entropy?", 4)
    right = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert ask(right, "What is entropy?", 4).usage.completion_tokens >= 1


def test_a_public_address_needs_a_key(tmp_path, tiny_config, monkeypatch):  # noqa: F811
    kv = Kvdb(tmp_path / "home", tiny_config)
    monkeypatch.delenv("KVDB_API_KEY", raising=False)
    refused = kv("serve", "--host", "0.0.0.0", "--port", str(free_port()), ok=False)
    assert "without an API key" in refused.stderr and "--insecure" in refused.stderr
    assert not (tmp_path / "home" / "kvdb.sqlite").exists()  # refused before anything was opened or loaded
    from kvdb.serve import check_bind

    check_bind("0.0.0.0", KEY, False)
    check_bind("0.0.0.0", None, True)
    check_bind("::1", None, False)
    check_bind("localhost", None, False)


def test_a_model_that_cannot_load_is_one_line_before_the_port_opens(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text(f"model:\n  source: {tmp_path / 'no-such-model'}\n")
    refused = Kvdb(tmp_path / "home", config)("serve", "--port", str(free_port()), ok=False)
    assert "no-such-model" in refused.stderr and "Traceback" not in refused.output


@pytest.mark.integration
def test_serves_the_embedded_model(tmp_path):
    """The default config (the embedded SmolLM2 and MiniLM): the served answer equals the CLI's, token for token."""
    home = tmp_path / "home"
    kv = Kvdb(home)
    kv("add", "--domain", "cs", "-q", "What is a B-tree?",
       "-a", "A balanced search tree whose nodes hold many sorted keys, so lookups touch few disk pages.")
    kv("build")
    from kvdb.config import CONFIG_DIR

    proc = ServerProcess(home, CONFIG_DIR / "default.yaml")
    try:
        proc.wait_ready(600)
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0, timeout=300)
        reply = ask(client, "How do B-trees keep lookups fast?", 24)
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           ask(client, "How do B-trees keep lookups fast?", 24, stream=True) if c.choices)
    finally:
        proc.stop()
    cli = kv.json("query", "--generate", "-n", "24", "How do B-trees keep lookups fast?")
    assert reply.model_extra["kvdb"]["output_ids"] == cli["output_ids"]
    assert reply.choices[0].message.content == streamed == cli["answer"]
