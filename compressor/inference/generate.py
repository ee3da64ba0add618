"""transformers' ``generate`` on a loaded model, decoded by the native step instead of the model's own modules.

A model's forward costs a decode step about 20 ms of module calls and small tensor operations
around 7 ms of products here (SmolLM2-135M); :class:`~compressor.inference.decoder.Decoder` runs a
step in one native call. :func:`install` gives a model a forward that takes that path whenever
the call is one it computes exactly as the model would, batch-1 inference into a cache, and
otherwise hands the call to the model's own forward unchanged:

- no gradients, token ids (not embeddings), one sequence without padding, no labels, no
  attentions or hidden states asked for;
- a cache (``generate`` makes one per call) that is empty or that this path filled: the native
  keys and values live beside it (:class:`~compressor.inference.kv_cache.SequenceKV`), the cache
  object itself stays empty, and its ``crop`` (assisted generation's rejected candidates) crops
  the native keys;
- layers the step knows: plain or packed linear layers. A model whose layers were replaced since
  (PEFT's LoRA layers, for one) is planned again at the next empty cache, refused, and runs
  through its own forward, adapters included.

The numbers are the step's: the same kernels as serving, within float rounding of the model's own
forward (tested), and prompts through the row-wise kernels (``prefill="rowwise"``), so a prompt's
numbers are those of feeding it token by token.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..native.matmul import all_cores
from .decoder import Decoder, UnsupportedModel
from .kv_cache import SequenceKV
from .multilora import Routing, RowwiseLinear

log = logging.getLogger(__name__)


class NativeGeneration:
    """The native path of one model: its decoder step (planned on first use) and the caches it fills."""

    def __init__(self, model: nn.Module, own_forward, threads: int | None = None):
        self.model, self.own_forward, self.threads = model, own_forward, threads
        self.decoder: Decoder | None = None
        self.planned_for: tuple[int, ...] = ()  # the model's modules when the step was planned
        self.refused: str | None = None
        self.caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformers cache -> SequenceKV

    def _plan(self) -> Decoder | None:
        # Planned again whenever the modules changed (an adapter wrapped, a layer replaced).
        modules = tuple(id(m) for m in self.model.modules())
        if modules != self.planned_for:
            self.planned_for, self.decoder, self.refused = modules, None, None
            try:
                head = RowwiseLinear(self.model.get_output_embeddings(), threads=self.threads)
                self.decoder = Decoder(self.model, Routing(), self.threads, prefill="rowwise", head=head)
            except UnsupportedModel as e:
                self.refused = str(e)
                log.info("generate runs through the model's own forward: %s", e)
        return self.decoder

    def _takes(self, input_ids, attention_mask, cache, inputs_embeds, labels, kwargs) -> bool:
        if torch.is_grad_enabled() or input_ids is None or inputs_embeds is not None or labels is not None or cache is None:
            return False
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states")):
            return False
        if attention_mask is not None and not bool(attention_mask.all()):
            return False
        if cache in self.caches:
            return True
        return cache.get_seq_length() == 0 and self._plan() is not None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs):  # fmt: skip
        """The model's forward, through the native step where it computes the same thing (see the module's docstring)."""
        if not self._takes(input_ids, attention_mask, cache, inputs_embeds, labels, kwargs):
            return self.own_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                    inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
                                    **kwargs)  # fmt: skip
        kv = self.caches.get(cache)
        if kv is None:
            kv = SequenceKV(self.decoder.cache_shape(), torch.float32, capacity=max(64, input_ids.shape[1] * 2),
                            limit=getattr(self.model.config, "max_position_embeddings", None))  # fmt: skip
            self.caches[cache] = kv
            cache.crop = _crop_native(kv)
        ids = input_ids[0].tolist()
        keep = len(ids) if not logits_to_keep or not isinstance(logits_to_keep, int) else min(logits_to_keep, len(ids))
        logits = self.decoder.forward([ids], [None], [kv], logit_rows=list(range(len(ids) - keep, len(ids))))
        return CausalLMOutputWithPast(logits=logits[None].to(self.model.dtype), cache=cache)


def _crop_native(kv: SequenceKV):
    # Cache.crop's contract (a negative length counts back from the end), on the native keys.
    def crop(max_length: int) -> None:
        kv.crop(max_length if max_length >= 0 else kv.length + max_length)

    return crop


def install(model: nn.Module, threads: int | None = None) -> NativeGeneration:
    """Give ``model`` (a causal LM from :func:`compressor.load`) the native forward for batch-1 inference; returns its state."""
    native = NativeGeneration(model, model.forward, threads or all_cores())
    model.forward = native.forward
    model._native_generation = native
    return native
