"""Request bodies of the HTTP API, in OpenAI's field names (with vLLM's sampling extensions); pydantic validates them (a bad body is 422).

A field we know and do not support (tools, structured output, suffix, ...) is named by
:meth:`Sampling.unsupported`, which the API answers with a 400; fields nobody handles (``user``,
``metadata``, ...) are accepted and ignored, as OpenAI's own server ignores what it does not use.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

INT64 = 2**63  # seeds are int64, as vLLM and OpenAI's clients take them
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs (and vLLM's default)
MAX_N = 16  # choices per prompt
# Known fields this server refuses rather than ignores: a client relying on them would be misled.
UNSUPPORTED = ("suffix", "tools", "functions", "function_call", "audio", "prediction", "guided_json", "guided_regex",
               "guided_choice", "guided_grammar", "structured_outputs")  # fmt: skip


class StreamOptions(BaseModel):
    """OpenAI's stream_options: whether the last chunk carries usage."""

    include_usage: bool = False


class Sampling(BaseModel):
    """Fields shared by completions and chat: the model (adapter or base) and how to sample."""

    model_config = ConfigDict(extra="allow")  # unknown fields are kept, so that unsupported() can name them

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's defaults, so OpenAI clients get what they expect
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's: 0 or -1 for no limit
    min_p: float = Field(0.0, ge=0, le=1)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10)  # vLLM's; 1 is none
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM's extension: always write max_tokens (benchmarks)

    def unsupported(self) -> list[str]:
        """The fields of this body that ask for something the server does not do."""
        extra = self.model_extra or {}
        found = [name for name in UNSUPPORTED if extra.get(name) not in (None, [], "")]
        if extra.get("best_of") not in (None, self.n):
            found.append("best_of")
        if extra.get("tool_choice") not in (None, "none", "auto"):
            found.append("tool_choice")
        format_ = extra.get("response_format")
        if format_ is not None and not (isinstance(format_, dict) and format_.get("type") == "text"):
            found.append("response_format")
        modalities = extra.get("modalities")
        if modalities is not None and modalities != ["text"]:
            found.append("modalities")
        return found


class CompletionBody(Sampling):
    """POST /v1/completions: a prompt string, a list of them, a list of token ids, or a list of such lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ContentPart(BaseModel):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is served."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class Message(BaseModel):
    """One chat turn; ``developer`` is OpenAI's newer name for ``system``."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatBody(Sampling):
    """POST /v1/chat/completions: turns formatted with the tokenizer's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI clients send this instead of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class AdapterBody(BaseModel):
    """POST /v1/adapters: load the adapter folder ``path`` (under the adapter root) as ``name``."""

    name: str
    path: str
