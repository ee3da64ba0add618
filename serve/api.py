"""The OpenAI-compatible HTTP API over a :class:`~serve.service.Service`, with admin routes and metrics.

The same app fronts one engine in this process (``python -m serve``) and a Ray Serve cluster of
them (``python -m serve.cluster``). A client that goes away cancels its request: a stream's
generator is cancelled by Starlette, and a non-streamed request checks for a disconnect every
:data:`serve.responses._POLL_SECONDS`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .auth import OPEN, ApiKeys, Grant
from .errors import BadRequest, ServeError
from .metrics import Metrics
from .prompts import Plan, chat_plan, completion_plan
from .responses import Generation, collect, error, sse
from .schemas import AdapterBody, ChatBody, CompletionBody, Sampling
from .service import Service
from .types import AdapterInfo, SamplingParams

_RETRY_AFTER_SECONDS = "1"  # a queue slot frees as soon as any running sequence finishes
MAX_CHOICES = 64  # prompts times n in one request: each takes a place in the engine's queue


def create_app(service: Service, keys: ApiKeys | None = None) -> FastAPI:
    """An app serving ``service``; it starts the service on startup and stops it on shutdown.

    With ``keys``, every route but ``/health`` needs ``Authorization: Bearer KEY``; without, all is
    open. ``app.state.scrape()`` renders ``/metrics``, for a listener of its own (:func:`metrics_app`).
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

    async def generate(http: Request, body: Sampling, who: Grant, plan: Callable[[], Plan]) -> Response:
        status, gen = 500, None
        try:
            who.check_model(body.model, service.base_name)
            unsupported = body.unsupported()
            if unsupported:
                raise BadRequest(f"not supported by this server: {', '.join(unsupported)}")
            todo = plan()
            if len(todo.prompts) * body.n > MAX_CHOICES:
                raise BadRequest(f"{len(todo.prompts)} prompts times n={body.n} is more than {MAX_CHOICES} choices")
            params = [_params(body, todo, j) for j in range(body.n)]
            adapter = None if body.model == service.base_name else body.model
            submitted = time.perf_counter()
            streams = []
            try:
                for ids in todo.prompts:
                    for p in params:
                        streams.append(await service.open(adapter, ids, p))
            except BaseException:
                for stream in streams:  # choices already queued do not outlive the request
                    stream.close()
                raise
            gen = Generation(streams, metrics, body.model, submitted, sum(len(ids) for ids in todo.prompts))
            if body.stream:
                status = 200  # the stream counts as served once its headers go out

                async def close_unstarted() -> None:  # async, so it runs on the loop like the stream's own close
                    gen.close()  # a client gone before the first chunk never starts the generator, so its finally never runs

                return StreamingResponse(
                    sse(gen, todo.shape, service.tokenizer), media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, background=BackgroundTask(close_unstarted),
                )  # fmt: skip
            status, response = await collect(http, gen, todo.shape, service.tokenizer)
            return response
        except ServeError as e:
            status = e.status
            raise
        finally:
            # The model name is user input: only names the service knows become label values.
            known = gen is not None or service.knows(body.model)
            metrics.requests.labels(body.model if known else "other", str(status)).inc()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request, who: Grant = Depends(grant)) -> Response:
        """OpenAI completions: ``prompt`` is a string, a list of strings, a list of token ids or a list of such lists."""
        return await generate(http, body, who, lambda: completion_plan(body, service.tokenizer))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: Request, who: Grant = Depends(grant)) -> Response:
        """OpenAI chat completions: messages go through the tokenizer's chat template."""
        return await generate(http, body, who, lambda: chat_plan(body, service.tokenizer, service.context_length))

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

    async def scrape() -> Response:
        content, content_type = metrics.render(await service.stats())
        return Response(content, media_type=content_type)

    @app.get("/metrics")
    async def prometheus(who: Grant = Depends(grant)) -> Response:
        """Prometheus text format; with keys, for metrics and admin keys only, since labels name every tenant's adapters."""
        who.check_metrics()
        return await scrape()

    app.state.scrape = scrape
    return app


def metrics_app(app: FastAPI) -> FastAPI:
    """``/metrics`` of ``app`` without keys, for a listener of its own (``--metrics-port``): scrapers on a private network need no token."""
    scraper = FastAPI(title="compressor serve metrics")

    @scraper.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text format, open."""
        return await app.state.scrape()

    return scraper


def _params(body: Sampling, plan: Plan, choice: int) -> SamplingParams:
    """The engine's parameters for choice ``choice`` of a prompt; a seeded request gives each choice its own seed."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    bias = []
    for key, value in (body.logit_bias or {}).items():
        if not key.strip().lstrip("-").isdigit():
            raise BadRequest(f"logit_bias: {key!r} is not a token id")
        if not -100 <= value <= 100:
            raise BadRequest(f"logit_bias: {value} for token {key} is outside [-100, 100]")
        bias.append((int(key), value))
    stop_ids = tuple(body.stop_token_ids or ())
    try:
        return SamplingParams(
            max_tokens=plan.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0), min_p=body.min_p,
            seed=None if body.seed is None else body.seed + choice, stop=stop, stop_token_ids=stop_ids, ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, logit_bias=tuple(bias), logprobs=plan.logprobs,
            prompt_logprobs=plan.prompt_logprobs,
        )  # fmt: skip
    except ValueError as e:
        raise BadRequest(str(e)) from None


def _adapter_json(info: AdapterInfo) -> dict:
    body = asdict(info) | {"targets": list(info.targets), "replicas": list(info.replicas)}
    if not info.replicas:  # one process: there are no replicas to name
        del body["replicas"]
    return body


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, the framework's included, answers in OpenAI's error format."""

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError) -> JSONResponse:
        headers = {429: {"Retry-After": _RETRY_AFTER_SECONDS}, 401: {"WWW-Authenticate": "Bearer"}}.get(e.status)
        code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(e).__name__).lower()  # QueueFull -> queue_full
        return error(e.status, str(e) or type(e).__doc__ or code, code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return error(422, problems, "invalid_body")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail), "http_error", e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so the server still logs the traceback.
        return error(500, "internal server error", "internal_error")
