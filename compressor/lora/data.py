"""Training examples from JSON lines: plain text, prompt and completion, or chat messages.

Every line becomes token ids and labels, the labels of tokens that are not trained on set to -100
(the value ``CrossEntropyLoss`` ignores): a completion is trained on without its prompt, a chat on
its assistant turns only. A file with any bad line is refused as a whole, naming each bad line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CompressorError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One training sequence: ids and labels of equal length (labels IGNORE where there is no loss)."""

    input_ids: list[int]
    labels: list[int]


def read_jsonl(path: Path) -> list[dict]:
    """Parse every line of ``path``; one error listing every malformed line (up to ten) if any is bad."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CompressorError(path, f"cannot read ({e})") from None
    records, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            problems.append(f"line {number}: not JSON ({e.msg})")
            continue
        problem = _shape_problem(record)
        if problem:
            problems.append(f"line {number}: {problem}")
        else:
            records.append(record)
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CompressorError(path, "; ".join(problems[:10]) + more)
    if not records:
        raise CompressorError(path, "no examples")
    return records


def _shape_problem(record) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return '"messages" must be a non-empty list'
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return 'each message needs string "role" and "content"'
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message to train on"
        return None
    if "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            return '"prompt" and "completion" must both be strings'
        return None
    if isinstance(record.get("text"), str):
        return None
    return 'expected "text", "prompt" and "completion", or "messages"'


def encode(record: dict, tokenizer, seq_len: int) -> Example:
    """Tokenize one record and mask what is not trained on; truncated to ``seq_len`` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "messages" in record:
        ids, labels = _encode_chat(record["messages"], tokenizer)
    elif "prompt" in record:
        prompt = tokenizer(record["prompt"], add_special_tokens=False).input_ids
        completion = tokenizer(record["completion"], add_special_tokens=False).input_ids + eos
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    else:
        ids = tokenizer(record["text"], add_special_tokens=False).input_ids + eos
        labels = list(ids)
    return Example(ids[:seq_len], labels[:seq_len])


def _encode_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    # Each assistant turn's tokens are those the full rendering adds past the rendering of the
    # conversation before it with the generation prompt: the template decides, not a guess at its markers.
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(_render(tokenizer, messages[:i], generation_prompt=True))
            end = len(_render(tokenizer, messages[: i + 1], generation_prompt=False))
            labels[start:end] = ids[start:end]
    return ids, labels


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True)
    return list(out["input_ids"])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` (padding ignored)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
