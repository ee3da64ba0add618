"""Request bodies to what to generate: completions' prompts in OpenAI's four shapes, chat messages through the chat template."""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

from .errors import BadRequest
from .responses import Shape
from .schemas import ChatBody, CompletionBody

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # tools are not served


def given_prompts(body: CompletionBody) -> list[str] | list[list[int]]:
    """Each prompt as the body gives it, a string or a list of ids: OpenAI's four shapes made one."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise BadRequest("prompt: the list is empty")
    return [list(prompt)] if isinstance(prompt[0], int) else list(prompt)


def completion_prompts(given: list[str] | list[list[int]], tokenizer) -> list[list[int]]:
    """The token ids of each prompt (the engine checks them against the vocabulary)."""
    prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in given]
    for i, ids in enumerate(prompts):
        if not ids:
            raise BadRequest(f"prompt {i}: empty" + (" after tokenization" if isinstance(given[i], str) else ""))
    return prompts


def chat_prompt(body: ChatBody, tokenizer) -> list[int]:
    """The token ids of the messages as the tokenizer's chat template writes them, ready for the assistant's turn."""
    messages = []
    for i, m in enumerate(body.messages):
        if m.role not in ROLES:
            raise BadRequest(f"messages.{i}.role: {m.role!r} is not served; roles are {', '.join(ROLES)}")
        messages.append({"role": ROLES[m.role], "content": _text(m.content, f"messages.{i}.content")})
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except (TemplateError, ValueError) as e:
        raise BadRequest(f"the chat template refused the messages: {e}") from None
    if not ids:
        raise BadRequest("the chat template wrote an empty prompt")
    return list(ids)


def _text(content, where: str) -> str:
    # Text parts join with newlines, as vLLM joins them; other parts (images, audio, files) are refused.
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise BadRequest(f"{where}.{j}: only text parts are served, not {part.type!r}")
        texts.append(part.text)
    return "\n".join(texts)


@dataclass(frozen=True)
class Plan:
    """What one request generates: its prompts, each ``n`` times, how long, with which log-probabilities, and how the answer looks."""

    prompts: list[list[int]]
    max_tokens: int
    shape: Shape
    logprobs: int | None = None  # alternatives per generated token
    prompt_logprobs: int | None = None  # alternatives per prompt token (echo)


def completion_plan(body: CompletionBody, tokenizer) -> Plan:
    """A completions body's plan; OpenAI's default of 16 tokens, and ``max_tokens`` 0 only to echo (score) the prompt."""
    given = given_prompts(body)
    prompts = completion_prompts(given, tokenizer)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise BadRequest("max_tokens: 0 is only for echo (scoring the prompt)")
    echo = None
    if body.echo:
        texts = [g if isinstance(g, str) else tokenizer.decode(g) for g in given]
        echo = tuple(t for t in texts for _ in range(body.n))
    # Scoring alone still runs the prompt position by position, so ask for its log-probabilities even if unreported.
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else (0 if max_tokens == 0 else None)
    shape = Shape(chat=False, logprobs=body.logprobs, echo=echo, prompt_ids=tuple(tuple(p) for p in prompts for _ in range(body.n)),
                  include_usage=_include_usage(body))  # fmt: skip
    return Plan(prompts, max_tokens, shape, body.logprobs, prompt_logprobs)


def chat_plan(body: ChatBody, tokenizer, context_length: int) -> Plan:
    """A chat body's plan; without a limit a reply may fill the context, as OpenAI's does."""
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs: needs logprobs set to true")
    ids = chat_prompt(body, tokenizer)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, context_length - len(ids))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return Plan([ids], max_tokens, Shape(chat=True, logprobs=logprobs, include_usage=_include_usage(body)), logprobs)


def _include_usage(body) -> bool:
    return body.stream and body.stream_options is not None and body.stream_options.include_usage
