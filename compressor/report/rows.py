"""The rows of the trade-off report: each one way of holding the same model in memory.

A row is ours (the float checkpoint quantized by ``compressor quantize``, then loaded from the
folder), bitsandbytes' (the float checkpoint quantized on the fly by ``BitsAndBytesConfig``, the
reference users know), or the float model itself at a given dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

OURS, BITSANDBYTES, FLOAT = "compressor", "bitsandbytes", "float"


@dataclass(frozen=True)
class Row:
    """One configuration to measure."""

    name: str
    source: str  # OURS, BITSANDBYTES or FLOAT
    method: str = ""  # as on the command line: nf4, fp4, int8, int8-sym, int4, int3, int2; empty for float
    blocksize: int | None = None
    double_quant: bool = True
    per_tensor: bool = False
    dtype: str = "float32"  # float rows: the dtype the model is loaded and run in
    optimize: str = "none"  # our nf4/fp4 rows: how scales and codes are chosen (needs the report's calibration text)
    budget_bits: float | None = None  # our rows: keep the most harmed layers in float within this many bits per parameter


REFERENCE = Row("float32", FLOAT)

ALL_ROWS: tuple[Row, ...] = (
    REFERENCE,
    Row("bfloat16", FLOAT, dtype="bfloat16"),
    Row("int8 per row", OURS, "int8"),
    Row("int8 per tensor", OURS, "int8", per_tensor=True),
    Row("int8-sym", OURS, "int8-sym"),
    Row("nf4 b32", OURS, "nf4", blocksize=32),
    Row("nf4 b64", OURS, "nf4", blocksize=64),
    Row("nf4 b64 no-dq", OURS, "nf4", blocksize=64, double_quant=False),
    Row("nf4 b64 scales", OURS, "nf4", blocksize=64, optimize="scales"),
    Row("nf4 b64 gptq", OURS, "nf4", blocksize=64, optimize="gptq"),
    Row("nf4 b64 gptq budget 4.5", OURS, "nf4", blocksize=64, optimize="gptq", budget_bits=4.5),
    Row("nf4 b128", OURS, "nf4", blocksize=128),
    Row("fp4 b64", OURS, "fp4", blocksize=64),
    Row("int4 b32", OURS, "int4", blocksize=32),
    Row("int4 b64", OURS, "int4", blocksize=64),
    Row("int4 b128", OURS, "int4", blocksize=128),
    Row("int3 b64", OURS, "int3", blocksize=64),
    Row("int2 b64", OURS, "int2", blocksize=64),
    Row("bnb nf4", BITSANDBYTES, "nf4"),
    Row("bnb fp4", BITSANDBYTES, "fp4"),
    Row("bnb int8", BITSANDBYTES, "int8-sym"),
)

# The quick report: one row per kind of format, and bitsandbytes' NF4 to check ours against.
QUICK_ROWS: tuple[str, ...] = ("float32", "int8 per row", "int8-sym", "nf4 b64", "nf4 b64 gptq", "fp4 b64", "int4 b64", "int2 b64", "bnb nf4")


def select(methods: tuple[str, ...] | None, quick: bool, calibrated: bool = False) -> tuple[Row, ...]:
    """The rows to measure: those of the given methods (or all, or the quick set), always with the float32 reference.

    Rows that optimize against calibration text are left out when the report has none.
    """
    rows = ALL_ROWS if calibrated else tuple(r for r in ALL_ROWS if r.optimize == "none" and r.budget_bits is None)
    if quick:
        rows = tuple(r for r in rows if r.name in QUICK_ROWS)
    if methods:
        known = {r.method for r in ALL_ROWS if r.method} | {r.name for r in ALL_ROWS if r.source == FLOAT}
        unknown = sorted(set(methods) - known)
        if unknown:
            raise ValueError(f"unknown method {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        rows = tuple(r for r in rows if r.method in methods or r.name in methods)
    return (REFERENCE, *(r for r in rows if r != REFERENCE))
