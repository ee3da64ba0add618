"""The OpenAI-compatible HTTP API over a :class:`~serve.service.Service`, with admin routes and metrics.

The same app fronts one engine in this process (``python -m serve``) and a Ray Serve cluster of
them (``python -m serve.cluster``). A client that goes away cancels its request: a stream's
generator is cancelled by Starlette, and a non-streamed request checks for a disconnect every
:data:`_POLL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .auth import OPEN, ApiKeys, Grant
from .errors import ServeError
from .metrics import Metrics
from .schemas import AdapterBody, ChatBody, CompletionBody, Sampling
from .service import Service, Stream
from .types import AdapterInfo, Event, SamplingParams

_POLL_SECONDS = 0.25  # how soon a non-streamed request notices that its client left
_RETRY_AFTER_SECONDS = "1"  # a queue slot frees as soon as any running sequence finishes
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
# How a request that did not finish ends, as HTTP: the engine failed it, or the server could not finish it.
_FAILURES = {"error": 500, "cancelled": 503, "unavailable": 503}


class BadRequest(ServeError):
    """A well-formed body the server still cannot serve: empty prompt, bad chat messages."""

    status = 400


class _Job:
    """One submitted request: its stream of events, and the metrics they update."""

    def __init__(self, stream: Stream, metrics: Metrics, model: str, submitted: float):
        self.stream, self.model, self.done, self._metrics, self._first = stream, model, False, metrics, True
        self._submitted = submitted
        self.created = int(time.time())

    async def next(self, timeout: float | None = None) -> Event:
        """The next event; raises ``TimeoutError`` if none came within ``timeout`` seconds."""
        event = await self.stream.next(timeout)
        if self._first and event.completion_tokens:
            self._first = False
            self._metrics.ttft.observe(time.perf_counter() - self._submitted)
        if event.finished:
            self.done = True
            self._metrics.tokens.labels(self.model).inc(event.completion_tokens)
        return event

    def close(self) -> None:
        """Cancel the request unless it already finished; safe to call twice."""
        if not self.done:
            self.done = True
            self.stream.close()


def create_app(service: Service, keys: ApiKeys | None = None) -> FastAPI:
    """An app serving ``service``; it starts the service on startup and stops it on shutdown.

    With ``keys``, every route but ``/health`` needs ``Authorization: Bearer KEY``; without, all is open.
    """
    metrics = Metrics()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        for info in await service.adapters():  # adapters loaded before the app started (``--adapter``)
            metrics.adapter_load.observe(info.load_seconds)
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="compressor serve", lifespan=lifespan)
    _add_error_handlers(app)

    async def grant(authorization: str | None = Header(None)) -> Grant:  # async: a sync dependency costs a thread hop per request
        return OPEN if keys is None else keys.grant_for(authorization)

    async def generate(http: Request, body: Sampling, who: Grant, prompt_ids: list[int], max_tokens: int, chat: bool) -> Response:
        status, job = 500, None
        try:
            who.check_model(body.model, service.base_name)
            if not prompt_ids:
                raise BadRequest("the prompt is empty after tokenization")
            params = _params(body, max_tokens)
            adapter = None if body.model == service.base_name else body.model
            submitted = time.perf_counter()
            job = _Job(await service.open(adapter, prompt_ids, params), metrics, body.model, submitted)
            if body.stream:
                status = 200  # the stream counts as served once its headers go out
                include_usage = body.stream_options is not None and body.stream_options.include_usage

                async def close_unstarted() -> None:  # async, so it runs on the loop like the stream's own close
                    job.close()  # a client gone before the first chunk never starts the generator, so its finally never runs

                return StreamingResponse(
                    _sse(job, chat, include_usage), media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, background=BackgroundTask(close_unstarted),
                )  # fmt: skip
            status, response = await _collect(http, job, chat)
            return response
        except ServeError as e:
            status = e.status
            raise
        finally:
            # The model name is user input: only names the service knows become label values.
            known = job is not None or service.knows(body.model)
            metrics.requests.labels(body.model if known else "other", str(status)).inc()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request, who: Grant = Depends(grant)) -> Response:
        """OpenAI completions: ``prompt`` is one string."""
        max_tokens = body.max_tokens or 16  # OpenAI's default for completions
        return await generate(http, body, who, service.tokenizer.encode(body.prompt), max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: Request, who: Grant = Depends(grant)) -> Response:
        """OpenAI chat completions: messages go through the tokenizer's chat template."""
        messages = [m.model_dump() for m in body.messages]
        try:
            ids = service.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except (TemplateError, ValueError) as e:
            raise BadRequest(f"the chat template refused the messages: {e}") from None
        # Without a limit a chat reply may fill the context, as OpenAI's does.
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, service.context_length - len(ids))
        return await generate(http, body, who, list(ids), max_tokens, chat=True)

    @app.get("/v1/models")
    async def models(who: Grant = Depends(grant)) -> dict:
        """The base and the loaded adapters this key may use, in OpenAI's list format."""
        data = [{"id": service.base_name, "object": "model", "created": started, "owned_by": "base"}] if who.base else []
        for info in await service.adapters():
            if who.may_use(info.name, service.base_name):
                data.append({"id": info.name, "object": "model", "created": started, "owned_by": "adapter", "parent": service.base_name})
        return {"object": "list", "data": data}

    @app.get("/v1/adapters")
    async def adapters(who: Grant = Depends(grant)) -> dict:
        """Admin: every resident adapter with its size and use."""
        who.check_admin()
        return {"object": "list", "data": [_adapter_json(info) for info in await service.adapters()]}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: AdapterBody, who: Grant = Depends(grant)) -> dict:
        """Admin: load an adapter from under the adapter root."""
        who.check_admin()
        info = await service.load_adapter(body.name, body.path)
        metrics.adapter_load.observe(info.load_seconds)
        return _adapter_json(info)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, who: Grant = Depends(grant)) -> dict:
        """Admin: unload an adapter; requests using it finish first."""
        who.check_admin()
        await service.unload_adapter(name)
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health() -> dict:
        """Liveness, open to load balancers."""
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(who: Grant = Depends(grant)) -> Response:
        """Prometheus text format; admin-only with keys, since labels name every tenant's adapters."""
        who.check_admin()
        content, content_type = metrics.render(await service.stats())
        return Response(content, media_type=content_type)

    return app


def _params(body: Sampling, max_tokens: int) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop,
                              ignore_eos=body.ignore_eos)  # fmt: skip
    except ValueError as e:
        raise BadRequest(str(e)) from None


async def _collect(http: Request, job: _Job, chat: bool) -> tuple[int, Response]:
    """Wait for the whole answer; (HTTP status, response). Status 499 if the client left first."""
    text, loop = [], asyncio.get_running_loop()
    check_at = loop.time() + _POLL_SECONDS
    while True:
        try:
            event = await job.next(max(0.0, check_at - loop.time()))
        except TimeoutError:
            event = None
        # Checked on a clock, not only when idle: a busy request's events never leave a gap.
        if loop.time() >= check_at:
            if await http.is_disconnected():
                job.close()
                return 499, Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            check_at = loop.time() + _POLL_SECONDS
        if event is not None:
            text.append(event.text)
            if event.finished:
                break
    if event.finish_reason in _FAILURES:
        status = _FAILURES[event.finish_reason]
        return status, _error(status, _failure(event), "generation_error" if event.finish_reason == "error" else event.finish_reason)
    choice = {"index": 0, "logprobs": None, "finish_reason": event.finish_reason}
    choice |= {"message": {"role": "assistant", "content": "".join(text)}} if chat else {"text": "".join(text)}
    body = _envelope(job, chat, stream=False) | {"choices": [choice], "usage": _usage(event)}
    return 200, JSONResponse(body)


async def _sse(job: _Job, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's server-sent chunks, then ``data: [DONE]``; closing or cancelling it cancels the request."""
    try:
        first = True
        while True:
            event = await job.next()
            if event.finish_reason in _FAILURES:
                yield _data({"error": {"message": _failure(event), "type": "server_error", "code": event.finish_reason}})
                break
            if event.text or event.finished or (chat and first):
                if chat:
                    delta = ({"role": "assistant"} if first else {}) | ({"content": event.text} if event.text or first else {})
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": event.finish_reason}
                else:
                    choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason}
                yield _data(_envelope(job, chat, stream=True) | {"choices": [choice]})
                first = False
            if event.finished:
                if include_usage:
                    yield _data(_envelope(job, chat, stream=True) | {"choices": [], "usage": _usage(event)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.close()


def _failure(event: Event) -> str:
    if event.finish_reason == "error":
        return f"generation failed: {event.error}"
    # Requests end "cancelled" without a client asking only when the server shuts down.
    return event.error or "the server is shutting down"


def _envelope(job: _Job, chat: bool, stream: bool) -> dict:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.stream.id}", "object": kind, "created": job.created, "model": job.model}


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}  # fmt: skip


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _adapter_json(info: AdapterInfo) -> dict:
    body = asdict(info) | {"targets": list(info.targets), "replicas": list(info.replicas)}
    if not info.replicas:  # one process: there are no replicas to name
        del body["replicas"]
    return body


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body: ``{"error": {"message", "type", "code"}}``."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, the framework's included, answers in OpenAI's error format."""

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError) -> JSONResponse:
        headers = {429: {"Retry-After": _RETRY_AFTER_SECONDS}, 401: {"WWW-Authenticate": "Bearer"}}.get(e.status)
        code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(e).__name__).lower()  # QueueFull -> queue_full
        return _error(e.status, str(e) or type(e).__doc__ or code, code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return _error(422, problems, "invalid_body")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), "http_error", e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so the server still logs the traceback.
        return _error(500, "internal server error", "internal_error")
