"""The quantization methods users name on the command line, importable without torch.

The command line parses its arguments before anything heavy is imported, so that a command can
set up the process (see ``cli._quantize``) before torch loads. :mod:`compressor.formats` maps each
name to its config.
"""

METHODS = ("nf4", "fp4", "int8", "int8-sym", "int4", "int3", "int2")
