"""Perplexity on a text, and agreement with a float reference (mean KL per token, top-1 match)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checks import load_tokenizer, model_folder, same_vocabulary, window_fits
from .errors import at_least
from .loading import load
from .text import text_windows


@dataclass(frozen=True)
class EvalJob:
    """One ``compressor eval`` run."""

    model_dir: Path
    text: Path
    windows: int = 8
    seq_len: int = 512
    reference_dir: Path | None = None
    progress: bool = True

    def __post_init__(self):
        at_least("windows", self.windows, 1)
        at_least("seq_len", self.seq_len, 2)  # a window of one token predicts nothing


@dataclass(frozen=True)
class EvalResult:
    """Figures of one evaluation; ``kl`` and ``agreement`` are None without a reference."""

    perplexity: float
    tokens: int
    windows: int
    kl: float | None = None
    agreement: float | None = None
    reference_perplexity: float | None = None

    def lines(self) -> list[str]:
        """Human-readable report."""
        out = [f"perplexity        {self.perplexity:.4f} over {self.tokens:,} predicted tokens in {self.windows} windows"]
        if self.reference_perplexity is not None:
            change = 100 * (self.perplexity / self.reference_perplexity - 1)
            out += [
                f"reference ppl     {self.reference_perplexity:.4f} (change {change:+.2f}%)",
                f"mean KL to ref    {self.kl:.5f} nats/token",
                f"top-1 agreement   {100 * self.agreement:.2f}%",
            ]
        return out


@torch.no_grad()
def evaluate_models(model, batches: torch.Tensor, reference=None, progress: bool = False) -> EvalResult:
    """Score ``model`` (and compare with ``reference``) on token windows ``(windows, seq_len)``."""
    nll = kl = ref_nll = 0.0
    agree = count = 0
    for ids in tqdm(batches, desc="eval", unit="window", disable=not progress):
        ids = ids.unsqueeze(0)
        logp = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        nll += -logp.gather(1, targets[:, None]).sum().item()
        count += targets.numel()
        if reference is not None:
            ref_logp = F.log_softmax(reference(ids).logits[0, :-1].float(), dim=-1)
            ref_nll += -ref_logp.gather(1, targets[:, None]).sum().item()
            kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
            agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
    if reference is None:
        return EvalResult(perplexity=math.exp(nll / count), tokens=count, windows=len(batches))
    return EvalResult(
        perplexity=math.exp(nll / count), tokens=count, windows=len(batches),
        kl=kl / count, agreement=agree / count, reference_perplexity=math.exp(ref_nll / count),
    )  # fmt: skip


def evaluate(job: EvalJob) -> EvalResult:
    """Run ``job``: load the model (and reference), tokenize the text, score it."""
    model_folder(job.model_dir)
    window_fits(job.model_dir, job.seq_len, "--seq")
    if job.reference_dir is not None:
        model_folder(job.reference_dir, tokenizer=False)
        same_vocabulary(job.reference_dir, job.model_dir)
    batches = text_windows(load_tokenizer(job.model_dir), job.text, job.windows, job.seq_len)
    model = load(job.model_dir)
    reference = load(job.reference_dir) if job.reference_dir else None
    return evaluate_models(model, batches, reference, job.progress)
