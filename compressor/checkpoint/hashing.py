"""sha256 of a safetensors shard, computed from its tensors as the compressor reads them.

A safetensors file is its 8-byte header length, the JSON header, then every tensor's bytes with no
holes; reading the tensors in file order therefore replays the file. Hashing those bytes instead of
reading the file a second time saves a pass over the whole checkpoint. If the replay does not add
up to the file's size (a file with holes, or tensors not fed in file order), the file is hashed the
ordinary way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .dtypes import raw_bytes


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ShardHash:
    """Feed the tensors of one shard in file order; :meth:`hexdigest` is the file's sha256.

    Args:
        path: the shard.
        header: the file's bytes before its first tensor.
    """

    def __init__(self, path: Path, header: bytes):
        self.path = path
        self._hash = hashlib.sha256(header)
        self._fed = len(header)

    def feed(self, tensor: torch.Tensor) -> None:
        """Add the next tensor's bytes (hashlib releases the GIL while it hashes them)."""
        data = raw_bytes(tensor)
        self._hash.update(data)
        self._fed += len(data)

    def hexdigest(self) -> str:
        """The sha256 of the file."""
        if self._fed != self.path.stat().st_size:
            return sha256_file(self.path)
        return self._hash.hexdigest()
