"""Request bodies of the HTTP API, in OpenAI's field names; pydantic validates them (a bad body is 422)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class StreamOptions(BaseModel):
    """OpenAI's stream_options: whether the last chunk carries usage."""

    include_usage: bool = False


class Sampling(BaseModel):
    """Fields shared by completions and chat: the model (adapter or base) and how to sample."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's defaults, so OpenAI clients get what they expect
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request; ask again for more
    ignore_eos: bool = False  # vLLM's extension: always write max_tokens (benchmarks)


class CompletionBody(Sampling):
    """POST /v1/completions: one prompt string."""

    prompt: str


class Message(BaseModel):
    """One chat turn."""

    role: str
    content: str


class ChatBody(Sampling):
    """POST /v1/chat/completions: turns formatted with the tokenizer's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI clients send this instead of max_tokens


class AdapterBody(BaseModel):
    """POST /v1/adapters: load the adapter folder ``path`` (under the adapter root) as ``name``."""

    name: str
    path: str
