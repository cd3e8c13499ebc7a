"""`kvdb serve`: kvdb over HTTP, OpenAI-compatible (FastAPI on uvicorn), with its models loaded once at start-up.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (``stream`` as server-sent events), POST /v1/query,
GET|POST /v1/pairs, GET|DELETE /v1/pairs/{hash}, POST /v1/build, GET /metrics (Prometheus text format).

- An answer is exactly `kvdb query --generate` on the last user message: retrieval, prompt and lossless speculative
  decoding, so its tokens are the base model's greedy tokens. Sampling (temperature > 0) is refused, not answered
  greedily behind the caller's back.
- The base model is one: answers run one at a time in worker threads (KnowledgeBase.model_lock), so an answer never
  depends on what else runs; the event loop stays free for cheap requests. A client that goes away (a dropped stream
  or an abandoned request) stops its answer at the next verify step and frees the model.
- Errors are OpenAI-shaped JSON, ``{"error": {"message", "type", "code"}}``; library errors are mapped to HTTP in one
  table (``ERROR_STATUS``); an unexpected exception is logged and answered with a bare 500, never a traceback.
- With an API key every endpoint but /health needs ``Authorization: Bearer KEY`` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvdb import __version__
from kvdb.api import AnswerResult, KnowledgeBase
from kvdb.errors import (AmbiguousError, AnswerCancelled, ConflictError, KvdbError, NotBuiltError, NotFoundError,
                         ValidationError)

log = logging.getLogger(__name__)

MODEL_ID = "kvdb"
MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body above this is refused (413) before it is read further
MAX_NEW_TOKENS = 4096
MAX_WAITING = 64  # answers running or queued for the model at once; more are refused (503) rather than piled up


# -- errors: one table from library errors to HTTP ---------------------------------------------------------------
class ApiError(Exception):
    """An HTTP-level refusal (auth, body size, an unsupported option) with its status, type and code."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_


ERROR_STATUS: list[tuple[type[KvdbError], int, str]] = [  # first match wins: subclasses before their bases
    (ValidationError, 400, "invalid_request_error"),
    (AmbiguousError, 400, "invalid_request_error"),
    (NotFoundError, 404, "not_found_error"),
    (ConflictError, 409, "conflict_error"),
    (NotBuiltError, 409, "not_built_error"),
    (AnswerCancelled, 499, "cancelled_error"),
    (KvdbError, 500, "server_error"),  # store, model, schema and corruption errors: the server's, not the request's
]


def error_body(message: str, type_: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


def error_response(exc: BaseException) -> JSONResponse:
    """The one place an exception becomes an HTTP answer."""
    if isinstance(exc, ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.code), status_code=exc.status)
    if isinstance(exc, KvdbError):
        status, type_ = next((s, t) for cls, s, t in ERROR_STATUS if isinstance(exc, cls))
        code = "".join("_" + c.lower() if c.isupper() else c for c in type(exc).__name__).lstrip("_")
        return JSONResponse(error_body(str(exc), type_, code), status_code=status)
    if isinstance(exc, RequestValidationError):
        return JSONResponse(error_body(_validation_message(exc), "invalid_request_error", "invalid_request"),
                            status_code=400)
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code), status_code=exc.status_code)
    log.error("unexpected error while serving a request", exc_info=exc)
    return JSONResponse(error_body("internal server error (logged by the server)", "server_error", "internal_error"),
                        status_code=500)


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one sentence: the first problem, where it is, and how many there are."""
    errors = exc.errors()
    if not errors:
        return "the request is not valid"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


# -- request bodies ------------------------------------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """OpenAI's chat completion request; fields kvdb cannot honour are refused, others it does not need ignored."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, ge=0, le=1)
    n: StrictInt | None = Field(None, ge=1, le=128)
    stop: StrictStr | list[StrictStr] | None = None
    logprobs: StrictBool | None = None
    tools: list[Any] | None = None
    top_k: StrictInt | None = Field(None, ge=1, le=1000)  # kvdb's own: pairs retrieved as reference
    domain: StrictStr | None = None  # kvdb's own: search only this domain


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: StrictStr
    top_k: StrictInt | None = Field(None, ge=1, le=1000)
    domain: StrictStr | None = None


class BuildRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    domain: StrictStr = "all"
    rebuild: StrictBool = False


def question_of(req: ChatRequest) -> str:
    """The last user message, after refusing what greedy, single-answer decoding cannot give."""
    if req.model not in (None, MODEL_ID):
        raise ApiError(404, f"model {req.model!r} does not exist; this server serves {MODEL_ID!r}", "model_not_found")
    if req.temperature is not None and req.temperature > 0:
        raise ApiError(400, "sampling (temperature > 0) is not supported: kvdb answers with the model's greedy "
                            "tokens; send temperature 0 or leave it out", "sampling_not_supported")
    if req.n not in (None, 1):
        raise ApiError(400, "n > 1 is not supported: greedy decoding has one answer", "unsupported_parameter")
    for name in ("stop", "logprobs", "tools"):
        if getattr(req, name):
            raise ApiError(400, f"{name!r} is not supported by kvdb", "unsupported_parameter")
    users = [m for m in req.messages if m.role == "user"]
    if not users:
        raise ApiError(400, "messages: needs a user message (its text is the question)", "invalid_request")
    question = users[-1].text()
    if not question.strip():
        raise ApiError(400, "messages: the last user message is empty", "invalid_request")
    return question


# -- metrics -------------------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of this app's own (two apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvdb_requests", "HTTP requests answered", ["endpoint", "method", "status"], registry=r)
        self.errors = Counter("kvdb_request_errors", "HTTP requests answered with a 4xx or 5xx", ["endpoint", "status"],
                              registry=r)
        self.latency = Histogram("kvdb_request_seconds", "Time to answer an HTTP request (to the last byte)",
                                 ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = Counter("kvdb_generated_tokens", "Answer tokens generated (verified by the base model)",
                              registry=r)
        self.verify_steps = Counter("kvdb_verify_steps", "Verify passes of the base model", registry=r)
        self.drafted = Counter("kvdb_drafted_tokens", "Draft tokens proposed to the base model", registry=r)
        self.accepted = Counter("kvdb_accepted_tokens", "Draft tokens the base model accepted", registry=r)
        self.accepted_per_step = Histogram("kvdb_accepted_tokens_per_verify_step",
                                           "Draft tokens accepted per verify step, one observation per answer",
                                           registry=r, buckets=(0, 0.5, 1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.cancelled = Counter("kvdb_answers_cancelled", "Answers stopped early because their client went away",
                                 registry=r)
        self.answers_waiting = Gauge("kvdb_answers_in_flight", "Answers running or waiting for the model",
                                     registry=r)

    def answered(self, stats: dict[str, Any]) -> None:
        steps = int(stats.get("verify_steps", 0))
        self.tokens.inc(int(stats.get("new_tokens", 0)))
        self.verify_steps.inc(steps)
        self.drafted.inc(int(stats.get("drafted", 0)))
        self.accepted.inc(int(stats.get("accepted", 0)))
        if steps:
            self.accepted_per_step.observe(int(stats.get("accepted", 0)) / steps)


_ENDPOINTS = ("/health", "/v1/models", "/v1/chat/completions", "/v1/query", "/v1/pairs", "/v1/build", "/metrics")


def endpoint_label(path: str) -> str:
    """The route a path belongs to (a bounded label set: hashes and unknown paths do not become labels)."""
    if path.startswith("/v1/pairs/"):
        return "/v1/pairs/{hash}"
    return path if path in _ENDPOINTS else "other"


# -- the ASGI guard: auth, body size, metrics ----------------------------------------------------------------------
class Guard:
    """ASGI middleware in front of the app: checks the API key, caps the body size, counts and times requests."""

    def __init__(self, app, api_key: str | None, metrics: Metrics, max_body_bytes: int):
        self.app, self.api_key, self.metrics, self.max_body = app, api_key, metrics, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint, start, status = endpoint_label(scope["path"]), time.perf_counter(), [500]

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, counted_send)
                return
            await self._run(scope, receive, counted_send)
        finally:
            self._count(endpoint, scope["method"], status[0], time.perf_counter() - start)

    def _refusal(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", "invalid_api_key",
                                "authentication_error")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return ApiError(413, f"the request body is over the {self.max_body}-byte limit", "body_too_large")
        return None

    async def _run(self, scope, receive, send) -> None:
        seen = [0]

        async def capped_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body:  # a chunked body without a length: counted as it arrives
                    raise StarletteHTTPException(413, f"the request body is over the {self.max_body}-byte limit")
            return message

        await self.app(scope, capped_receive, send)

    def _count(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.metrics.requests.labels(endpoint, method, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.metrics.errors.labels(endpoint, str(status)).inc()


# -- answers in worker threads -------------------------------------------------------------------------------------
class Generation:
    """One answer in a worker thread of its own; verified text pieces and the end reach the event loop through a
    queue. ``cancel()`` (the client went away) stops the decoding at its next verify step and frees the model."""

    def __init__(self, kb: KnowledgeBase, metrics: Metrics, question: str, max_new_tokens: int | None,
                 top_k: int | None, domain: str | None):
        self.kb, self.metrics, self.args = kb, metrics, (question, max_new_tokens, top_k, domain)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()
        self.ended = False

    def start(self) -> "Generation":
        threading.Thread(target=self._run, name="kvdb-answer", daemon=True).start()
        return self

    def _put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.stop.set()

    def _run(self) -> None:
        try:
            result = self.kb.answer(*self.args, on_text=lambda piece: self._put("text", piece), stop=self.stop)
            self._put("done", result)
        except AnswerCancelled as exc:
            self.metrics.cancelled.inc()
            self._put("error", exc)
        except BaseException as exc:  # handed to the request, which answers it in the one error mapping
            self._put("error", exc)

    def cancel(self) -> None:
        self.stop.set()

    async def next_event(self) -> tuple[str, Any]:
        """The next piece (``text``), the result (``done``) or the exception (``error``)."""
        return await self.events.get()

    async def cancel_on_disconnect(self, request: Request) -> None:
        """Cancel the answer when the client goes away (run as a task while nothing else reads ``receive``: until
        a stream's response starts, Starlette listens for the disconnect itself from then on)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()


def finish_reason(result: AnswerResult, eos_ids: list[int]) -> str:
    ids = result.output_ids
    if ids and ids[-1] in eos_ids:
        return "stop"
    return "length" if len(ids) >= result.raw.max_new_tokens else "stop"


def usage_of(result: AnswerResult) -> dict[str, int]:
    prompt, completion = len(result.prompt_ids), len(result.output_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def kvdb_field(result: AnswerResult) -> dict[str, Any]:
    """What a chat completion carries beyond OpenAI's shape: the references, the decoding stats, the token ids."""
    out = result.to_dict()
    return {k: out[k] for k in ("query", "confident", "matches", "stats", "output_ids", "draft") if k in out}


def completion_body(cid: str, created: int, result: AnswerResult, eos_ids: list[int]) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": MODEL_ID,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": finish_reason(result, eos_ids)}],
            "usage": usage_of(result), "kvdb": kvdb_field(result)}


def chunk(cid: str, created: int, delta: dict[str, Any], finish: str | None = None, **extra) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# -- the app -------------------------------------------------------------------------------------------------------
class Server:
    """The state the endpoints share: the knowledge base, metrics, and the count of answers in flight."""

    def __init__(self, kb: KnowledgeBase, metrics: Metrics):
        self.kb, self.metrics = kb, metrics
        self.in_flight = 0
        self.started = int(time.time())

    def generate(self, req: ChatRequest) -> Generation:
        """Start an answer and wait for its first event, so that a refusal (a prompt over the context, nothing built)
        is still an HTTP error, not a broken stream."""
        question = question_of(req)
        if self.in_flight >= MAX_WAITING:
            raise ApiError(503, f"{MAX_WAITING} answers are already running or waiting; retry shortly",
                           "server_busy", "server_error")
        self.in_flight += 1
        self.metrics.answers_waiting.set(self.in_flight)
        gen = Generation(self.kb, self.metrics, question, req.max_completion_tokens or req.max_tokens, req.top_k,
                         req.domain)
        gen.start()
        return gen

    async def chat(self, request: Request, req: ChatRequest) -> Any:
        """A chat completion: the whole answer as one object, or (``stream``) a stream of its chunks."""
        gen = self.generate(req)
        watcher = asyncio.create_task(gen.cancel_on_disconnect(request))
        try:
            event = await gen.next_event()
            if req.stream and event[0] != "error":
                watcher.cancel()  # the stream's own listener takes over
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return StreamingResponse(_stream(self, gen, event, include_usage), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            while event[0] == "text":
                event = await gen.next_event()
        except BaseException:
            self.ended(gen)
            raise
        finally:
            watcher.cancel()
        self.ended(gen)
        if event[0] == "error":
            raise event[1]
        self.metrics.answered(event[1].stats)
        return completion_body(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), event[1], self.kb.lm().eos_ids)

    def ended(self, gen: Generation) -> None:
        """The request is done with ``gen`` (answered, failed or abandoned): stop it and free its place."""
        gen.cancel()
        if gen.ended:
            return
        gen.ended = True
        self.in_flight -= 1
        self.metrics.answers_waiting.set(self.in_flight)


def create_app(kb: KnowledgeBase, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               warm: bool = True):
    """The ASGI app serving ``kb``; with ``warm`` the models load (and take their first passes) at start-up."""
    metrics = Metrics()
    server = Server(kb, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if warm:
            log.info("loading models")
            await asyncio.to_thread(kb.warm)
            log.info("models loaded; serving")
        yield
        kb.close()

    app = FastAPI(title="kvdb", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    for exc_type in (KvdbError, ApiError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, lambda _request, exc: error_response(exc))
    _routes(app, server)
    return Guard(app, api_key, metrics, max_body_bytes)


def _routes(app: FastAPI, server: Server) -> None:
    kb, metrics = server.kb, server.metrics

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": server.started,
                                            "owned_by": "kvdb"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest):
        return await server.chat(request, req)

    @app.post("/v1/query")
    def query(req: QueryRequest) -> dict[str, Any]:
        return kb.query(req.query, req.top_k, req.domain).to_dict()

    @app.get("/v1/pairs")
    def list_pairs(domain: str | None = None) -> dict[str, Any]:
        return {"object": "list", "data": kb.list(domain)}

    @app.post("/v1/pairs")
    def add_pairs(body: Any = Body(...), replace: bool = False) -> dict[str, Any]:
        if not isinstance(body, (dict, list)):
            raise ValidationError("the body must be a pair object or a list of pair objects")
        report = kb.add_many([body] if isinstance(body, dict) else body, replace=replace)
        return {**report.as_dict(), "hashes": report.hashes}

    @app.get("/v1/pairs/{pair_hash}")
    def get_pair(pair_hash: str) -> dict[str, Any]:
        return kb.get(_full_hash(pair_hash))

    @app.delete("/v1/pairs/{pair_hash}")
    def delete_pair(pair_hash: str) -> dict[str, Any]:
        removed = kb.remove(_full_hash(pair_hash))
        return {"removed": len(removed), "hashes": removed}

    @app.post("/v1/build")
    def build(req: BuildRequest | None = None) -> dict[str, Any]:
        req = req or BuildRequest()
        return kb.build(req.domain, rebuild=req.rebuild, wait=False)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _full_hash(value: str) -> str:
    """Over HTTP a pair is named by its whole hash (a prefix that happens to be unique is too easy to get wrong)."""
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ApiError(400, "give the pair's full 64-character hash", "invalid_hash")
    return value


async def _stream(server: Server, gen: Generation, first: tuple[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: the role, the text as it is verified, the finish reason with
    kvdb's stats, optionally the usage, then ``data: [DONE]``. Leaving early (a disconnect) cancels the answer."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    try:
        yield chunk(cid, created, {"role": "assistant", "content": ""})
        event = first
        while event[0] == "text":
            yield chunk(cid, created, {"content": event[1]})
            event = await gen.next_event()
        if event[0] == "error":
            log.warning("answer failed mid-stream: %s", event[1])
            yield f"data: {error_response(event[1]).body.decode()}\n\n"
        else:
            result: AnswerResult = event[1]
            server.metrics.answered(result.stats)
            yield chunk(cid, created, {}, finish_reason(result, server.kb.lm().eos_ids),
                        kvdb=kvdb_field(result))
            if include_usage:
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                        "choices": [], "usage": usage_of(result)}
                yield f"data: {json.dumps(body)}\n\n"
        server.ended(gen)  # before the last event, so a client that reads it sees the model free
        yield "data: [DONE]\n\n"
    finally:
        server.ended(gen)


# -- start-up ------------------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to serve a non-loopback address to anyone who can reach it, unless told so."""
    if not is_loopback(host) and not api_key and not insecure:
        raise ValidationError(f"refusing to listen on {host} without an API key: anyone who can reach it could read "
                              "and change the knowledge base; give --api-key KEY (or KVDB_API_KEY), or --insecure")


def run(kb: KnowledgeBase, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        insecure: bool = False, log_level: str = "info") -> None:
    """Load ``kb``'s models, then serve it with uvicorn until interrupted. A model that cannot load is a KvdbError
    here, before the port opens (the CLI prints its one line)."""
    import uvicorn

    check_bind(host, api_key, insecure)
    kb.warm()
    uvicorn.run(create_app(kb, api_key=api_key or None, warm=False), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)
