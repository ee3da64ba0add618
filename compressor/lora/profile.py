"""Where one training step's time goes: forward, the recomputation of checkpointed layers, the backward proper, the optimizer.

``compressor train --profile`` runs its second step (the first warms up) under torch's profiler
and prints :meth:`StepProfile.lines`: each phase's wall time, split into decoding packed weights
(``dequantize``), matrix products, attention, the adapters' dropout (in training, with the rank-r products the mask is fused into) and the rest. The phases are the ``record_function``
ranges of the training loop; a checkpointed layer's forward that runs during the backward is the
recomputation, marked through checkpointing's ``context_fn`` while a step is profiled.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("forward", "backward", "optimizer")
PARTS = ("dequantize", "matmul", "attention", "dropout", "other")
_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::_mkldnn_matmul"}


@dataclass
class StepProfile:
    """Milliseconds of one step by (phase, part); the phases ``backward: recompute`` and ``backward: gradients`` split the backward."""

    ms: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    wall_ms: float = 0.0

    def lines(self) -> list[str]:
        """A table: one row per phase, its total then each part."""
        rows = ["forward", "backward: recompute", "backward: gradients", "optimizer"]
        out = [f"{'phase':22}{'total ms':>10}" + "".join(f"{p:>12}" for p in PARTS)]
        for row in rows + ["step"]:
            parts = {p: sum(self.ms[r][p] for r in rows) for p in PARTS} if row == "step" else self.ms[row]
            total = sum(parts[p] for p in PARTS)
            out.append(f"{row:22}{total:10.0f}" + "".join(f"{parts[p]:12.0f}" for p in PARTS))
        out.append(f"wall time of the step: {self.wall_ms:.0f} ms (the profiler's own cost included)")
        return out


class StepProfiler:
    """Profile one step: enter :meth:`step` around it, mark its phases with :meth:`phase`, and give checkpointing :meth:`contexts`."""

    def __init__(self):
        self._active = False
        self.result: StepProfile | None = None

    def contexts(self):
        """``torch.utils.checkpoint``'s ``context_fn``: while a step is profiled, the recomputation is a range of its own."""
        return nullcontext(), (record_function("recompute") if self._active else nullcontext())

    @contextmanager
    def phase(self, name: str):
        """A phase of the step (one of :data:`PHASES`), as a range the profiler records."""
        with record_function(name):
            yield

    @contextmanager
    def step(self):
        """Profile the block (one whole step); :attr:`result` holds the breakdown afterwards."""
        self._active = True
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                yield
        finally:
            self._active = False
        self.result = _breakdown(prof.events())


def _breakdown(events) -> StepProfile:
    out = StepProfile()
    for event in events:
        labels, parent = [], event.cpu_parent
        while parent is not None:
            labels.append(parent.name)
            parent = parent.cpu_parent
        labels.insert(0, event.name)
        phase = next((name for name in labels if name in PHASES), None)
        if phase is None:
            continue
        if event.name == phase:
            out.wall_ms += event.cpu_time_total / 1000
        row = phase if phase != "backward" else ("backward: recompute" if "recompute" in labels else "backward: gradients")
        if event.name in PHASES or event.name == "recompute":
            part = "other"  # the ranges' own time outside their children
        elif "dequantize" in labels:
            part = "dequantize"
        elif "dropout" in labels:
            part = "dropout"
        elif event.name in _MATMULS:
            part = "matmul"
        elif "attention" in event.name:
            part = "attention"
        else:
            part = "other"
        out.ms[row][part] += event.self_cpu_time_total / 1000
    return out
