"""Every set of names users choose from, importable without torch: the command lines offer these, the job dataclasses check against them.

The command line parses its arguments before anything heavy is imported, so that a command can
set up the process (see ``cli._quantize``) before torch loads.
"""

METHODS = ("nf4", "fp4", "int8", "int8-sym", "int4", "int3", "int2")  # compressor.formats maps each to its config
ABSMAX_ROUNDINGS = ("lut", "nearest")  # nf4/fp4 double quantization: bitsandbytes' CPU lookup table, or exact nearest
OPTIMIZERS = ("none", "scales", "gptq")  # how scales and codes are chosen (compressor.optimize)

# The linear layers of a Llama-style block, the usual QLoRA targets.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN_INITS = ("default", "loftq")
# What training multiplies the frozen base in: float32, or bfloat16 (packed weights decoded to bfloat16,
# the products on the CPU's bfloat16 units; attention, the adapter, optimizer and loss stay float32).
COMPUTE_DTYPES = ("float32", "bfloat16")  # how a fresh adapter starts: B = 0 (PEFT's), or from the base's quantization error
MERGE_OUTPUTS = ("same", "float32", "float16", "bfloat16")  # a merge writes the base's own format again, or a float dtype

EXPORT_ACTIVATIONS = ("fp32", "int8")  # ONNX MatMulNBits' activations: float32 (matches PyTorch) or int8 (faster, approximate)

# How the native kernels take a packed product's input: float32 (exact), or int8 per run of 32 (compressor.native.matmul).
ACTIVATIONS = ("float32", "int8")
# The output head as served: "float" as the checkpoint holds it (exact), or a copy in bfloat16 or
# int8 per row (int8-sym's codes), which the head's product reads a half or a quarter of.
HEADS = ("float", "bfloat16", "int8")
# A prompt's long chunks: torch's GEMM in float32 (exact) or in bfloat16 for the CPU's bfloat16
# matrix units (weights and activations rounded; several times faster), or "rowwise": the decode
# step's own kernels at any length, which with int8 activations run on the CPU's int8 matrix units
# (AMX) where it has them and beat either GEMM. Decode steps are not affected.
PREFILLS = ("float32", "bfloat16", "rowwise")
