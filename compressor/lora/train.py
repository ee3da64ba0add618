"""``compressor train``: fit a LoRA adapter on a frozen base (QLoRA when the base is quantized).

The base's linear layers stay packed (:class:`~compressor.nn.QuantLinear` dequantizes inside its
own autograd function); only the adapter's A and B are trained. The run is data-parallel under
``accelerate launch``: every process sees the same sequence of global batches and takes its slice,
and the loss is normalised by the global batch's token count, so any number of processes computes
the same gradients as one.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..checkpoint import manifest
from ..checks import float_folder, load_tokenizer, model_folder, output_free, window_fits
from ..choices import COMPUTE_DTYPES, TRAIN_INITS
from ..errors import CompressorError, FieldError, at_least, within
from ..loading import load
from ..memory import BufferPool, trim, trim_every
from ..nn import QuantLinear
from .adapters import save_adapter
from .data import IGNORE, Example, collate, encode, read_jsonl
from .fused import fuse_elementwise
from .head_loss import frozen_head_loss
from .layer import DEFAULT_TARGETS, LoraConfig, add_lora, rank_for
from .loftq import initialize
from .profile import StepProfile, StepProfiler


@dataclass(frozen=True)
class TrainJob:
    """One ``compressor train`` run. ``rank=None`` picks the rank from the model's size."""

    base_dir: Path
    data: Path
    out_dir: Path
    rank: int | None = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 2e-4
    steps: int | None = None  # optimizer steps; None: ``epochs`` passes over the training split
    epochs: float = 1.0
    batch_size: int = 8  # sequences per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    seq_len: int = 512
    eval_split: float = 0.1
    eval_every: int = 25
    seed: int = 0
    gradient_checkpointing: bool = False
    keep_layers: int = 0  # with checkpointing: the last this many layers keep their activations instead of recomputing them
    overwrite: bool = False
    progress: bool = True
    init: str = "default"  # "default": B = 0, as PEFT; "loftq": from the base's quantization error
    float_dir: Path | None = None  # loftq: the float checkpoint of the base; default: the one its manifest names
    calibration: Path | None = None  # loftq: text whose activations weigh the approximation (recommended)
    calibration_tokens: int = 16384
    compute: str = "float32"  # one of COMPUTE_DTYPES
    frozen_bf16: bool | None = None  # the embedding (and head) kept in bfloat16; None: with bfloat16 compute, or where that loses nothing
    profile: bool = False  # profile the second step (the first warms up): TrainSummary.profile

    def __post_init__(self):
        if self.init not in TRAIN_INITS:
            raise ValueError(f"init must be one of {', '.join(TRAIN_INITS)}, got {self.init!r}")
        if self.compute not in COMPUTE_DTYPES:
            raise FieldError("compute", f"must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute!r}")
        at_least("rank", self.rank, 1)
        within("dropout", self.dropout, 0, 1, high_open=True)
        if not self.targets:
            raise FieldError("targets", "must name at least one module")
        at_least("lr", self.lr, 0)
        at_least("steps", self.steps, 1)
        within("epochs", self.epochs, 0, float("inf"), low_open=True)
        at_least("batch_size", self.batch_size, 1)
        at_least("grad_accum", self.grad_accum, 1)
        at_least("seq_len", self.seq_len, 2)  # a sequence of one token has no next token to learn
        within("eval_split", self.eval_split, 0, 1, high_open=True)
        at_least("eval_every", self.eval_every, 1)
        at_least("calibration_tokens", self.calibration_tokens, 1)
        at_least("keep_layers", self.keep_layers, 0)
        if self.keep_layers and not self.gradient_checkpointing:
            raise FieldError("keep_layers", "applies to gradient checkpointing only (without it every layer keeps its activations)")


@dataclass
class TrainSummary:
    """What a run did."""

    rank: int
    rank_was_auto: bool
    trainable_params: int
    base_params: int
    steps: int
    train_examples: int
    eval_examples: int
    train_losses: list[float] = field(default_factory=list)  # per step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss), step 0 is the base
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    seconds: float = 0.0
    profile: StepProfile | None = None  # with TrainJob.profile

    def lines(self) -> list[str]:
        """Human-readable report."""
        rank = f"{self.rank} (auto: {self.base_params / 1e6:,.0f}M parameters)" if self.rank_was_auto else str(self.rank)
        out = [
            f"rank                {rank}",
            f"trainable params    {self.trainable_params:,} ({100 * self.trainable_params / self.base_params:.2f}% of the base)",
            f"examples            {self.train_examples} train, {self.eval_examples} held out",
            f"steps               {self.steps} in {self.seconds:.1f} s ({self.seconds / max(self.steps, 1):.2f} s/step)",
        ]
        if self.train_losses:
            out.append(f"train loss          {self.train_losses[0]:.4f} -> {self.train_losses[-1]:.4f}")
        if len(self.eval_losses) >= 2:
            (_, before), (_, after) = self.eval_losses[0], self.eval_losses[-1]
            out.append(f"held-out loss       {before:.4f} (base) -> {after:.4f} ({100 * (after / before - 1):+.1f}%)")
        if self.profile is not None:
            out += ["", f"profile of step {min(2, self.steps)}:", *self.profile.lines()]
        return out

    def to_json(self) -> dict:
        """The figures, for machines (``--metrics-json``): losses and step times per step."""
        return {k: v for k, v in self.__dict__.items() if k != "profile"} | (
            {"profile_ms": {row: dict(parts) for row, parts in self.profile.ms.items()}} if self.profile else {}
        )


def train(job: TrainJob) -> TrainSummary:
    """Run ``job`` and write the adapter folder at ``job.out_dir`` (on the main process)."""
    from accelerate import Accelerator

    # Every input is checked before the slow part, and before anything is written.
    output_free(job.out_dir, job.overwrite)
    model_folder(job.base_dir)
    window_fits(job.base_dir, job.seq_len, "--seq-len")
    float_dir = None
    if job.init == "loftq":
        float_dir = job.float_dir or manifest.float_source(job.base_dir)
        model_folder(float_dir, tokenizer=job.calibration is not None)  # the float model tokenizes the calibration text
        float_folder(float_dir, "--init loftq")
    start = time.perf_counter()
    accelerator = Accelerator(cpu=True)  # CPU only: the packed kernels are CPU code, and no GPU path is tested
    world, rank_id = accelerator.num_processes, accelerator.process_index
    micro = job.batch_size // (world * job.grad_accum)
    if micro * world * job.grad_accum != job.batch_size:
        raise CompressorError(
            "--batch-size", f"batch size {job.batch_size} does not split into {world} processes x {job.grad_accum} accumulation steps"
        )
    torch.manual_seed(job.seed)
    tokenizer = load_tokenizer(job.base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train_set, eval_set = _split([encode(r, tokenizer, job.seq_len) for r in read_jsonl(job.data)], job.eval_split, job.seed, job.data)

    model = load(job.base_dir)  # in the checkpoint's dtypes: widened to float32 below, but for what stays bfloat16
    frozen_bf16 = job.frozen_bf16 if job.frozen_bf16 is not None else (job.compute == "bfloat16" or _bf16_is_lossless(model))
    _widen(model, keep=_frozen_weights(model) if frozen_bf16 else [])
    profiler = StepProfiler()
    base_params = sum(_logical_params(m) for m in model.modules())
    cfg = LoraConfig(job.rank or rank_for(base_params), job.alpha, job.dropout, job.targets)
    if job.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": profiler.contexts})
        layers = list(getattr(model.get_decoder(), "layers", []))
        for i, layer in enumerate(layers):
            kept = i >= len(layers) - job.keep_layers
            if kept:
                layer.gradient_checkpointing = False  # not recomputed: the forward's activations serve the backward
            products = [m for m in layer.modules() if isinstance(m, QuantLinear)]
            for m in products:
                # A recomputed layer's decoded weights serve its backward (see nn.py), but for its last
                # product: its output is the layer's, which the layer's backward does not read, so saving
                # nothing it is not recomputed at all (see lora/product.py) and is decoded in the backward.
                # A kept layer decodes each weight again in the backward rather than hold it from the forward.
                m.reuse_in_backward = not kept and m is not products[-1]
    fuse_elementwise(model)
    if job.compute == "bfloat16":
        _bf16_products(model)
    if frozen_bf16:
        _frozen_in_bf16(model)
    head = model.get_output_embeddings()
    # The head multiplies in bfloat16 only when the job computes in it; a bfloat16 head otherwise widens its slices.
    head_dtype = head.weight.dtype if job.compute == "bfloat16" and head is not None else torch.float32
    try:
        modules = add_lora(model, cfg)
    except ValueError as e:
        raise CompressorError(job.base_dir, str(e)) from None
    if job.init == "loftq":
        initialize(modules, float_dir, job.calibration, job.calibration_tokens, job.seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)
    trim_every(getattr(model.get_decoder(), "layers", []), TRIM_EVERY_LAYERS)
    model, optimizer = accelerator.prepare(model, optimizer)

    steps = job.steps or max(1, math.ceil(job.epochs * len(train_set) / job.batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * (1 - s / steps))
    summary = TrainSummary(cfg.rank, job.rank is None, sum(p.numel() for p in params), base_params, steps, len(train_set), len(eval_set))
    if eval_set:
        summary.eval_losses.append((0, _eval_loss(model, eval_set, micro, pad_id, accelerator, head_dtype)))
    order = _batches(len(train_set), job.batch_size, steps, job.seed)

    bar = tqdm(total=steps, desc="train", unit="step", disable=not (job.progress and accelerator.is_main_process))
    model.train()
    # The step's large tensors come from buffers reused step after step (see memory.py).
    with BufferPool():
        for step, batch in enumerate(order, 1):
            profiled = job.profile and step == min(2, steps)
            began = time.perf_counter()
            examples = [train_set[i] for i in batch]
            tokens = sum(_trained_tokens(e) for e in examples)
            mine = examples[rank_id * micro * job.grad_accum : (rank_id + 1) * micro * job.grad_accum]
            loss_sum = 0.0
            with profiler.step() if profiled else nullcontext():
                for k in range(job.grad_accum):
                    chunk = mine[k * micro : (k + 1) * micro]
                    with accelerator.no_sync(model) if k < job.grad_accum - 1 else nullcontext():
                        with profiler.phase("forward"):
                            total = _loss_sum(model, collate(chunk, pad_id), head_dtype)
                        with profiler.phase("backward"):
                            # DDP averages gradients over processes; times ``world`` makes that a sum over the global batch.
                            accelerator.backward(total * world / max(tokens, 1))
                    loss_sum += total.item()
                with profiler.phase("optimizer"):
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
            if profiled:
                summary.profile = profiler.result
            trim()  # the step's activations and decoded weights, back to the system rather than held at the peak
            loss = accelerator.reduce(torch.tensor(loss_sum), "sum").item() / max(tokens, 1)
            summary.train_losses.append(loss)
            summary.step_seconds.append(time.perf_counter() - began)
            if eval_set and (step % job.eval_every == 0 or step == steps):
                summary.eval_losses.append((step, _eval_loss(model, eval_set, micro, pad_id, accelerator, head_dtype)))
            bar.set_postfix(loss=f"{loss:.4f}", **({"held_out": f"{summary.eval_losses[-1][1]:.4f}"} if summary.eval_losses else {}))
            bar.update()
    bar.close()
    summary.seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        save_adapter(modules, cfg, job.out_dir, job.base_dir, job.overwrite)
    accelerator.wait_for_everyone()
    return summary


def _bf16_products(model) -> None:
    # --compute bfloat16: the frozen base's linear products in bfloat16 and everything else (norms,
    # attention, the adapters, the residual sums, the loss) in float32, as bitsandbytes' compute
    # dtype does. CPU autocast would put attention and the adapters in bfloat16 too: on SmolLM2 the
    # loss after 6 steps then stayed 0.11 above float32's, against 0.004 this way.
    head = model.get_output_embeddings()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.compute_dtype = torch.bfloat16
        elif isinstance(m, torch.nn.Linear) and m is not head:
            _bf16_linear(m)


def _frozen_weights(model) -> list[torch.Tensor]:
    # The embedding and the head (one tensor when tied): the largest float tensors of a packed base, and frozen.
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied_head = isinstance(head, torch.nn.Linear) and head.weight is not embedding.weight
    return [embedding.weight] + ([head.weight] if untied_head else [])


def _bf16_is_lossless(model) -> bool:
    # Most checkpoints are stored in bfloat16: their embedding and head, kept so, lose nothing, and
    # the head still multiplies in float32 (head_loss.py widens a slice at a time). Only for plain
    # heads, which train through that function; another architecture's forward would call the
    # head on bfloat16 inputs.
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD:
        return False
    return all(w.dtype == torch.bfloat16 or (w.dtype == torch.float32 and _holds_bf16(w)) for w in _frozen_weights(model))


def _holds_bf16(w: torch.Tensor) -> bool:
    # Exactly representable in bfloat16: the low 16 bits of every float32 are zero. By rows, so no
    # copy of the whole (large) matrix is made.
    bits = w.detach().view(torch.int32)
    rows = max(1, (1 << 22) // max(w.shape[-1], 1))
    return not any((bits[i : i + rows] & 0xFFFF).any() for i in range(0, bits.shape[0], rows))


def _widen(model, keep: list[torch.Tensor]) -> None:
    # model.float() but for ``keep``: widening the frozen embedding only to narrow it again would
    # hold both copies at once, the peak of a run on a large vocabulary.
    # Module.float() is this same _apply, with no exceptions.
    kept = {id(t) for t in keep}
    model._apply(lambda t: t.float() if t.is_floating_point() and id(t) not in kept else t)


def _frozen_in_bf16(model) -> None:
    # Nothing trains the embedding (and a head tied to it), so bfloat16 halves the largest float
    # tensors. Lookups come out in float32 again, so the residual stream keeps its precision; a head
    # called by the model's own forward takes its input in bfloat16 and gives float32 logits.
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    for w in _frozen_weights(model):
        w.data = w.data.to(torch.bfloat16)
    embedding.register_forward_hook(lambda m, args, out: out.float())
    if isinstance(head, torch.nn.Linear):
        _bf16_linear(head)  # its weight is bfloat16 now: only its hooks are added


def _bf16_linear(linear: torch.nn.Linear) -> None:
    # A frozen float linear layer whose product is bfloat16 in and float32 out.
    for p in (linear.weight, linear.bias):
        if p is not None and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
    linear.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype),))
    linear.register_forward_hook(lambda m, args, out: out.float())


def _logical_params(module: torch.nn.Module) -> int:
    # Parameters a module stands for, packed weights counted as the weights they encode.
    if isinstance(module, QuantLinear):
        return math.prod(module.state.shape) + (module.bias.numel() if module.bias is not None else 0)
    return sum(p.numel() for p in module.parameters(recurse=False))


def _trained_tokens(e: Example) -> int:
    return sum(label != IGNORE for label in e.labels[1:])


def _split(examples: list[Example], fraction: float, seed: int, path: Path) -> tuple[list[Example], list[Example]]:
    # Examples with nothing to learn (a prompt filling the whole window) would only dilute batches.
    usable = [e for e in examples if _trained_tokens(e)]
    if not usable:
        raise CompressorError(path, "no example has tokens to train on (prompts longer than --seq-len?)")
    random.Random(seed).shuffle(usable)
    held = round(len(usable) * fraction) if fraction > 0 and len(usable) > 1 else 0
    return usable[held:], usable[:held]


def _batches(n: int, batch_size: int, steps: int, seed: int):
    # The same sequence of global batches on every process: reshuffled each pass over the data.
    rng = random.Random(seed + 1)
    pool: list[int] = []
    for _ in range(steps):
        while len(pool) < batch_size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            pool += epoch
        yield pool[:batch_size]
        pool = pool[batch_size:]


# SmolLM2, bfloat16 compute: trimming the backward too took peak RSS from 1.40 to 0.94 GB; all the
# trims cost about 0.4 s of a 5.4 s step (every 6 layers: the same within noise, 0.96 GB).
TRIM_EVERY_LAYERS = 3

# Architectures whose logits are exactly ``lm_head(last hidden state)``: no soft-capping or scaling
# after the head. Only these take the chunked loss; others go through the model's own forward.
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "smollm3", "stablelm", "starcoder2"})
LOSS_CHUNK = 128  # a trained head: positions whose logits exist at once; 128 x 49k vocabulary is 25 MB in float32


def _loss_sum(model, batch: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Logits only at positions whose next token is trained on: over a 49k vocabulary the logits and
    # their gradients are most of a step's memory, and prompts are often most of a sequence. A
    # frozen head multiplies in ``dtype`` (see head_loss.py).
    labels = batch["labels"][:, 1:]
    keep = (labels != IGNORE).any(dim=0).nonzero().squeeze(1)
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, keep].flatten(), ignore_index=IGNORE, reduction="sum")
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hidden, targets = hidden[:, keep].flatten(0, 1), labels[:, keep].flatten()
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and not head.weight.requires_grad:
        return frozen_head_loss(hidden, head.weight, head.bias, targets, dtype)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], LOSS_CHUNK):
        # Checkpointed: a chunk's logits are dropped after its loss and recomputed in backward, so
        # the whole sequence's logits never exist at once.
        total = total + checkpoint(_head_loss, head, hidden[i : i + LOSS_CHUNK], targets[i : i + LOSS_CHUNK], use_reentrant=False)
    return total


def _head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def loss_and_tokens(model, examples: list[Example], pad_id: int, batch_size: int = 8,
                    head_dtype: torch.dtype = torch.float32) -> tuple[float, int]:  # fmt: skip
    """Summed cross-entropy over the trained tokens of ``examples``, and how many tokens that is (a frozen head multiplying in ``head_dtype``)."""
    was_training = model.training
    model.eval()
    loss = tokens = 0
    for i in range(0, len(examples), max(batch_size, 1)):
        chunk = examples[i : i + max(batch_size, 1)]
        loss += _loss_sum(model, collate(chunk, pad_id), head_dtype).item()
        tokens += sum(_trained_tokens(e) for e in chunk)
    model.train(was_training)
    return loss, tokens


def _eval_loss(model, examples: list[Example], micro: int, pad_id: int, accelerator, head_dtype: torch.dtype) -> float:
    # Token-weighted mean over the held-out set, each process scoring its share.
    loss, tokens = loss_and_tokens(model, examples[accelerator.process_index :: accelerator.num_processes], pad_id, micro, head_dtype)
    total = accelerator.reduce(torch.tensor([loss, float(tokens)]), "sum")
    return (total[0] / total[1].clamp(min=1)).item()
