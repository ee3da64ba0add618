"""OpenAI's answers from a request's streams: one JSON body, or server-sent chunks, for every choice (prompts times ``n``).

A :class:`Generation` merges the streams of one HTTP request into one sequence of (choice, event);
:func:`collect` waits for all of it, :func:`sse` writes chunks as events come. Log-probabilities go
out in the two formats OpenAI has: completions' lists (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``) and chat's ``content`` entries with bytes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .metrics import Metrics
from .service import Stream
from .types import Event, TokenLogprob

_POLL_SECONDS = 0.25  # how soon a non-streamed request notices that its client left
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
# How a request that did not finish ends, as HTTP: the engine failed it, or the server could not finish it.
FAILURES = {"error": 500, "cancelled": 503, "unavailable": 503}


@dataclass(frozen=True)
class Shape:
    """What the answer looks like: chat or completions, which log-probabilities, and the echoed prompts' texts."""

    chat: bool
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities
    echo: tuple[str, ...] | None = None  # completions' echo: each choice's prompt text
    prompt_ids: tuple[tuple[int, ...], ...] = ()  # each choice's prompt, for echoed log-probabilities
    include_usage: bool = False  # streams: a last chunk with usage


class Generation:
    """One HTTP request's choices: their streams merged into one sequence of (choice index, event), and the metrics they update."""

    def __init__(self, streams: list[Stream], metrics: Metrics, model: str, submitted: float, prompt_tokens: int):
        self.streams, self.model, self.prompt_tokens = streams, model, prompt_tokens
        self.created, self.id = int(time.time()), streams[0].id
        self._metrics, self._submitted, self._first = metrics, submitted, True
        self._open = len(streams)
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        # One stream (the common case) is read directly; several are pumped into one queue.
        self._pumps = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)] if len(streams) > 1 else []

    async def _pump(self, index: int, stream: Stream) -> None:
        while True:
            try:
                event = await stream.next()
            except Exception as e:  # noqa: BLE001 - reported to the client as that choice's failure
                event = Event("", (), 0, 0, "error", f"{type(e).__name__}: {e}")
            self._queue.put_nowait((index, event))
            if event.finished:
                return

    async def next(self, timeout: float | None = None) -> tuple[int, Event]:
        """The next (choice, event); raises ``TimeoutError`` if none came within ``timeout`` seconds."""
        if self._pumps:
            index, event = await asyncio.wait_for(self._queue.get(), timeout)
        else:
            index, event = 0, await self.streams[0].next(timeout)
        if self._first and event.completion_tokens:
            self._first = False
            self._metrics.ttft.observe(time.perf_counter() - self._submitted)
        if event.finished:
            self._open -= 1
            self._metrics.tokens.labels(self.model).inc(event.completion_tokens)
        return index, event

    @property
    def done(self) -> bool:
        """True once every choice has finished, or the request was closed."""
        return self._open == 0

    def close(self) -> None:
        """Cancel every choice that has not finished; safe to call twice."""
        self._open = 0
        for pump in self._pumps:
            pump.cancel()
        for stream in self.streams:
            stream.close()


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    completion_tokens: int = 0
    finish_reason: str | None = None
    started: bool = False  # streams: whether its first chunk went out
    offset: int = 0  # streams: characters of its text so far, for text_offset


class _Tokens:
    """Token ids as the strings and bytes OpenAI's log-probabilities show."""

    def __init__(self, tokenizer):
        self._tokenizer, self._cache = tokenizer, {}

    def text(self, token: int) -> str:
        if token not in self._cache:
            self._cache[token] = self._tokenizer.decode([token])
        return self._cache[token]

    def completion(self, entries: list[TokenLogprob], prompt: tuple[int, ...] | None, offset: int) -> dict:
        """Completions' log-probabilities of ``entries``, after the prompt's (echo: its first token has none)."""
        tokens, lps, tops = [], [], []
        if prompt is not None:
            tokens.append(self.text(prompt[0]))
            lps.append(None)
            tops.append(None)
        for e in entries:
            tokens.append(self.text(e.token))
            lps.append(e.logprob)
            tops.append({self.text(t): lp for t, lp in e.top} | {self.text(e.token): e.logprob})
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat(self, entries: list[TokenLogprob]) -> dict:
        """Chat's log-probabilities: one entry per token, with its bytes and alternatives."""

        def one(token: int, logprob: float) -> dict:
            text = self.text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [one(e.token, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries], "refusal": None}


async def collect(http: Request, gen: Generation, shape: Shape, tokenizer) -> tuple[int, Response]:
    """Wait for every choice; (HTTP status, response). Status 499 if the client left first."""
    choices = [_Choice() for _ in gen.streams]
    loop = asyncio.get_running_loop()
    check_at = loop.time() + _POLL_SECONDS
    while not gen.done:
        try:
            index, event = await gen.next(max(0.0, check_at - loop.time()))
        except TimeoutError:
            event = None
        # Checked on a clock, not only when idle: a busy request's events never leave a gap.
        if loop.time() >= check_at:
            if await http.is_disconnected():
                gen.close()
                return 499, Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            check_at = loop.time() + _POLL_SECONDS
        if event is None:
            continue
        if event.finish_reason in FAILURES:
            gen.close()
            status = FAILURES[event.finish_reason]
            return status, error(status, _failure(event), "generation_error" if event.finish_reason == "error" else event.finish_reason)
        _take(choices[index], event)
    tokens = _Tokens(tokenizer)
    body = []
    for i, c in enumerate(choices):
        text = "".join(c.text)
        if shape.chat:
            choice = {"index": i, "message": {"role": "assistant", "content": text}}
            logprobs = tokens.chat(c.logprobs) if shape.logprobs is not None else None
        else:
            echo = shape.echo[i] if shape.echo is not None else ""
            choice = {"index": i, "text": echo + text}
            logprobs = None
            if shape.logprobs is not None:
                logprobs = tokens.completion([*c.prompt_logprobs, *c.logprobs], shape.prompt_ids[i] if shape.echo is not None else None, 0)
        body.append(choice | {"logprobs": logprobs, "finish_reason": c.finish_reason})
    return 200, JSONResponse(_envelope(gen, shape.chat, stream=False) | {"choices": body, "usage": _usage(gen, choices)})


async def sse(gen: Generation, shape: Shape, tokenizer) -> AsyncIterator[str]:
    """OpenAI's server-sent chunks, then ``data: [DONE]``; closing or cancelling it cancels every choice."""
    choices, tokens = [_Choice() for _ in gen.streams], _Tokens(tokenizer)
    try:
        while not gen.done:
            index, event = await gen.next()
            if event.finish_reason in FAILURES:
                yield _data({"error": {"message": _failure(event), "type": "server_error", "code": event.finish_reason}})
                break
            c = choices[index]
            _take(c, event)
            first = not c.started
            if not (event.text or event.finished or first):
                continue
            c.started = True
            yield _data(_envelope(gen, shape.chat, stream=True) | {"choices": [_chunk(index, c, event, first, shape, tokens)]})
        else:
            if shape.include_usage:
                yield _data(_envelope(gen, shape.chat, stream=True) | {"choices": [], "usage": _usage(gen, choices)})
        yield "data: [DONE]\n\n"
    finally:
        gen.close()


def _chunk(index: int, c: _Choice, event: Event, first: bool, shape: Shape, tokens: _Tokens) -> dict:
    """One choice's streamed piece: its new text (after the echoed prompt, or the assistant's role, on the first) and log-probabilities."""
    if shape.chat:
        delta = ({"role": "assistant"} if first else {}) | ({"content": event.text} if event.text or first else {})
        logprobs = tokens.chat(list(event.logprobs)) if shape.logprobs is not None else None
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}
    echoed = shape.echo is not None and first
    echo = shape.echo[index] if echoed else ""
    logprobs = None
    if shape.logprobs is not None:
        entries = [*(event.prompt_logprobs or ()), *event.logprobs] if echoed else list(event.logprobs)
        logprobs = tokens.completion(entries, shape.prompt_ids[index] if echoed else None, c.offset)
        c.offset += sum(len(t) for t in logprobs["tokens"])
    return {"index": index, "text": echo + event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}


def _take(c: _Choice, event: Event) -> None:
    c.text.append(event.text)
    c.logprobs += event.logprobs
    if event.prompt_logprobs is not None:
        c.prompt_logprobs = event.prompt_logprobs
    c.completion_tokens = event.completion_tokens
    c.finish_reason = event.finish_reason


def _failure(event: Event) -> str:
    if event.finish_reason == "error":
        return f"generation failed: {event.error}"
    # Requests end "cancelled" without a client asking only when the server shuts down.
    return event.error or "the server is shutting down"


def _envelope(gen: Generation, chat: bool, stream: bool) -> dict:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{gen.id}", "object": kind, "created": gen.created, "model": gen.model}


def _usage(gen: Generation, choices: list[_Choice]) -> dict:
    # Each prompt counts once, however many choices it has (OpenAI's count).
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": completion, "total_tokens": gen.prompt_tokens + completion}


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body: ``{"error": {"message", "type", "code"}}``."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status, headers=headers)
