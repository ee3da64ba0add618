"""The LoRA lifecycle on a frozen (quantized) base, in PEFT's formats.

- :mod:`.layer`: the LoRA layer itself and where it goes (``LoraConfig``, ``add_lora``);
- :mod:`.adapters`: adapter folders in PEFT's layout: save, read, check against a base, apply;
- :mod:`.data`: training examples from JSONL (prompt/completion or chat), tokenized and batched;
- :mod:`.train`: QLoRA training into an adapter folder;
- :mod:`.loftq`: LoftQ's initialization, which starts an adapter at the quantization error;
- :mod:`.merge`: an adapter folded back into its base, written as one model.
"""

from .layer import DEFAULT_TARGETS, LoraConfig, LoraLinear, add_lora, rank_for

__all__ = ["DEFAULT_TARGETS", "LoraConfig", "LoraLinear", "add_lora", "rank_for"]
