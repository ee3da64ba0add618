"""Write a safetensors file one tensor at a time, holding none of them in memory.

``safetensors.save_file`` needs every tensor at once, and a shard of quantized output can still be a
gigabyte. :class:`ShardWriter` writes each tensor's bytes where they will stay as soon as it is
produced, behind a space reserved for the header. :meth:`ShardWriter.finish` then writes the 8-byte
little-endian header length and the JSON header into that space, padded with spaces as the format
allows. If the header outgrows its reservation, the data is moved once (by the kernel) behind a
larger one.

Tensors follow each other in the order they were added. The safetensors format does not require a
tensor to start at a multiple of its element size, and safetensors' readers copy such tensors as
usual; reordering for alignment would mean holding or re-copying the whole shard.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from .dtypes import TORCH_TO_SAFETENSORS, raw_bytes


class ShardWriter:
    """Collects tensors for one safetensors file; nothing is visible at ``path`` until :meth:`finish`.

    Args:
        path: where the finished file goes.
        header_reserve: bytes kept free for the JSON header (a generous estimate avoids a move).
    """

    def __init__(self, path: str | Path, header_reserve: int = 1 << 16):
        self.path = Path(path)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._reserve = header_reserve + (-header_reserve % 8)
        self._file = open(self._partial, "wb")
        self._file.seek(8 + self._reserve)
        self._header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; names must be unique within the file."""
        if name in self._header:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        data = raw_bytes(tensor.cpu())
        size = len(data)
        self._file.write(data)
        self._header[name] = {
            "dtype": TORCH_TO_SAFETENSORS[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.nbytes, self.nbytes + size],
        }
        self.nbytes += size

    def finish(self, metadata: dict[str, str] | None = None) -> Path:
        """Write the header, close the file and move it to ``path``."""
        header = {"__metadata__": dict(metadata)} if metadata else {}
        header.update(self._header)
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) <= self._reserve:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self._reserve) + text + b" " * (self._reserve - len(text)))
            self._file.close()
        else:
            self._file.close()
            self._move_behind_header(text)
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        self._file.close()
        self._partial.unlink(missing_ok=True)

    def _move_behind_header(self, text: bytes) -> None:
        # The reservation was too small: write a new file with the real header, then the data.
        text += b" " * (-len(text) % 8)
        moved = self._partial.with_name(self._partial.name + ".moved")
        with open(self._partial, "rb") as src, open(moved, "wb") as dst:
            dst.write(struct.pack("<Q", len(text)) + text)
            dst.flush()
            offset, count = 8 + self._reserve, self.nbytes
            while count:
                sent = os.copy_file_range(src.fileno(), dst.fileno(), count, offset)
                if sent <= 0:
                    raise OSError(f"copy_file_range stopped with {count} bytes left")
                offset += sent
                count -= sent
        os.replace(moved, self._partial)
