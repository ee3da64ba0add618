"""The summed cross-entropy of a frozen output head, and its gradient, without a batch's whole logits.

Over a large vocabulary the logits and their gradient are most of a step's memory. Here the head's
rows are taken a slice of the vocabulary at a time, against every position at once, with the
softmax's normaliser carried along as flash attention carries it (a running maximum and sum, the
accumulated gradient rescaled when the maximum moves). So:

* no more than one slice of logits exists at a time (:data:`LOGIT_ELEMENTS`);
* the gradient with respect to the hidden states, ``softmax @ W - W[target]``, is complete when the
  forward ends, and the backward has no head product to recompute (a third of the head's work);
* each slice of the weight is read, and converted to the product's dtype, once a step. A head kept
  in bfloat16 for memory still multiplies in float32 when the job computes in float32: a slice is
  widened just before its products, never the whole matrix.
"""

from __future__ import annotations

import torch

from ..memory import empty
from .data import IGNORE

LOGIT_ELEMENTS = 128 * 49152  # logits that exist at once: 25 MB in float32, SmolLM2's vocabulary at 128 positions


def frozen_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """Summed cross-entropy of ``hidden @ weight.T + bias`` (2-d hidden) at ``targets``, IGNORE not counted; products in ``dtype``."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _FrozenHeadLoss.apply(hidden, weight, bias, targets, dtype)
    return _sliced(hidden, weight, bias, targets, dtype, grad=False)[0]


def _sliced(hidden, weight, bias, targets, dtype, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    positions, vocabulary = hidden.shape[0], weight.shape[0]
    h = hidden.detach().to(dtype)
    picked = targets.clamp(min=0)
    running_max = torch.full((positions,), float("-inf"))
    running_sum = torch.zeros(positions)
    picked_logit = torch.zeros(positions)
    acc = torch.zeros(positions, weight.shape[1]) if grad else None  # sum of exp(logit - running_max) * W row
    rows = max(1, LOGIT_ELEMENTS // max(positions, 1))
    widened = None  # one buffer for every slice that changes dtype
    for start in range(0, vocabulary, rows):
        w = weight[start : start + rows]
        if w.dtype != dtype:
            widened = empty((rows, weight.shape[1]), dtype) if widened is None else widened
            w = widened[: w.shape[0]].copy_(w)
        # Transposed, (vocabulary, positions): W @ h.T runs a third faster than h @ W.T on a CPU.
        logits = torch.mm(w, h.T, out=empty((w.shape[0], positions), dtype)).float()
        if bias is not None:
            logits += bias[start : start + rows].float()[:, None]
        here = ((picked >= start) & (picked < start + w.shape[0])).nonzero().squeeze(1)
        picked_logit[here] = logits[picked[here] - start, here]
        new_max = torch.maximum(running_max, logits.amax(dim=0))
        rescale = (running_max - new_max).exp_()  # 0 at the first slice, where running_max is -inf
        probs = logits.sub_(new_max).exp_()  # softmax up to the normaliser
        running_sum.mul_(rescale).add_(probs.sum(dim=0))
        if acc is not None:
            acc.mul_(rescale[:, None])
            if dtype == torch.float32:
                acc.addmm_(probs.T, w)
            else:
                acc += (probs.T.to(dtype) @ w).float()
        running_max = new_max
        del logits, probs  # the next slice's product then reuses this one's buffer
    valid = targets != IGNORE
    total = ((running_max + running_sum.log() - picked_logit) * valid).sum()
    if acc is None:
        return total, None
    # d(loss)/dh = softmax @ W - W[target], at the positions that count.
    acc.div_(running_sum[:, None]).sub_(weight[picked].float()).mul_(valid[:, None])
    return total, acc.to(hidden.dtype)


class _FrozenHeadLoss(torch.autograd.Function):
    # The gradient is computed in the forward (see the module's docstring) and only scaled here.

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype):
        total, grad = _sliced(hidden, weight, bias, targets, dtype, grad=True)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None, None, None
