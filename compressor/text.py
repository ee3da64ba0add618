"""Real text as token windows: what perplexity, KL and calibration read.

One reading for every use: the file as UTF-8, tokenized without special tokens (a window is a
stretch of running text, not a document start), cut into whole non-overlapping windows from the start.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import CompressorError


def text_windows(tokenizer, text_path: Path, windows: int, seq_len: int) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``seq_len`` tokens of a text file, ``(windows, seq_len)``."""
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CompressorError(text_path, f"cannot read text ({e})") from None
    if not text.strip():
        raise CompressorError(text_path, "empty text")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    available = ids.numel() // seq_len
    if available == 0:
        raise CompressorError(text_path, f"only {ids.numel()} tokens; a window needs {seq_len}")
    n = min(windows, available)
    return ids[: n * seq_len].reshape(n, seq_len)
