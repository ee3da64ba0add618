"""Write a safetensors file one tensor at a time, holding none of them in memory.

``safetensors.save_file`` needs every tensor at once; a shard of quantized output can still be a
gigabyte. :class:`ShardWriter` appends each tensor's bytes to a spill file as it is produced and, on
:meth:`ShardWriter.finish`, writes the real file: an 8-byte little-endian header length, the JSON
header (padded with spaces to a multiple of 8, as the format allows), then the tensor bytes in
header order, copied from the spill file by the kernel. Tensors are ordered by decreasing element
size so that each one starts at an offset aligned to its dtype, which zero-copy readers want.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    spill_offset: int
    nbytes: int


class ShardWriter:
    """Collects tensors for one safetensors file; nothing is visible at ``path`` until :meth:`finish`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._spill_path = self.path.with_name(self.path.name + ".spill")
        self._spill = open(self._spill_path, "wb")
        self._entries: dict[str, _Entry] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; names must be unique within the file."""
        if name in self._entries:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy() if flat.numel() else b""
        offset = self._spill.tell()
        self._spill.write(memoryview(data))
        self._entries[name] = _Entry(name, tensor.dtype, tuple(tensor.shape), offset, flat.numel() * flat.element_size())
        self.nbytes += self._entries[name].nbytes

    def finish(self, metadata: dict[str, str] | None = None) -> Path:
        """Write the file at ``path`` and remove the spill file."""
        self._spill.close()
        order = sorted(self._entries.values(), key=lambda e: -e.dtype.itemsize)
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        start = 0
        for e in order:
            header[e.name] = {"dtype": _DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [start, start + e.nbytes]}
            start += e.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(self._spill_path, "rb") as src, open(self.path, "wb") as dst:
            dst.write(struct.pack("<Q", len(text)))
            dst.write(text)
            for e in order:
                _copy_range(src, dst, e.spill_offset, e.nbytes)
        self._spill_path.unlink()
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        self._spill.close()
        self._spill_path.unlink(missing_ok=True)


def _copy_range(src, dst, offset: int, count: int) -> None:
    # copy_file_range moves bytes inside the kernel, without passing them through our memory.
    dst.flush()
    while count:
        sent = os.copy_file_range(src.fileno(), dst.fileno(), count, offset) if hasattr(os, "copy_file_range") else 0
        if sent <= 0:  # not supported here: fall back to a buffered copy
            src.seek(offset)
            while count:
                chunk = src.read(min(count, 1 << 24))
                dst.write(chunk)
                count -= len(chunk)
            return
        offset += sent
        count -= sent
