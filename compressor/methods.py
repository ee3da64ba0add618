"""Names users type on the command line (quantization methods, LoRA targets), importable without torch.

The command line parses its arguments before anything heavy is imported, so that a command can
set up the process (see ``cli._quantize``) before torch loads. :mod:`compressor.formats` maps each
name to its config.
"""

METHODS = ("nf4", "fp4", "int8", "int8-sym", "int4", "int3", "int2")

# The linear layers of a Llama-style block, the usual QLoRA targets.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
