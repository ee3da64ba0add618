"""Find and open the safetensors shards of a Hugging Face checkpoint, one tensor at a time.

Shards are read with ``pread`` rather than memory-mapped: a mapping would leave every page of the
checkpoint in our resident set as we pass over it, and the compressor promises to need far less
memory than the checkpoint's size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CompressorError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_MAGIC_PICKLE = (b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder: its config and the shard files holding its tensors."""

    root: Path
    shards: tuple[Path, ...]
    sharded: bool  # whether the tensors are listed by an index file

    @property
    def config_path(self) -> Path:
        """The folder's ``config.json``."""
        return self.root / "config.json"


def _check_shard(path: Path) -> None:
    if not path.is_file():
        raise CompressorError(path, "missing file (listed by the checkpoint but not there)")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_MAGIC_PICKLE) and path.suffix != ".bin":
        raise CompressorError(path, "is a pickle, not a safetensors file")
    if len(head) < 8:
        raise CompressorError(path, "not a safetensors file (shorter than its 8-byte header length)")


def find_checkpoint(model_dir: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Locate config and shards of ``model_dir``, refusing pickled weights unless ``allow_pickle``."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CompressorError(root, "no such folder")
    if not (root / "config.json").is_file():
        raise CompressorError(root / "config.json", "missing file (every transformers checkpoint has one)")
    pickled = not (root / INDEX).is_file() and not (root / SINGLE).exists()
    if pickled and ((root / PICKLE_INDEX).is_file() or (root / PICKLE_SINGLE).exists()):
        found = root / (PICKLE_INDEX if (root / PICKLE_INDEX).is_file() else PICKLE_SINGLE)
        if not allow_pickle:
            raise CompressorError(found, "weights are a pickle; refusing to load it (pass --allow-pickle if you trust it)")
    index = root / (PICKLE_INDEX if pickled else INDEX)
    single = root / (PICKLE_SINGLE if pickled else SINGLE)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CompressorError(index, f"not a valid index file ({e})") from None
        shards = tuple(root / name for name in dict.fromkeys(weight_map.values()))
        sharded = True
    elif single.exists():
        shards, sharded = (single,), False
    else:
        raise CompressorError(root, f"no {SINGLE} or {INDEX} found")
    for shard in shards:
        _check_shard(shard)
    return Checkpoint(root=root, shards=shards, sharded=sharded)


class ShardReader:
    """Tensors of one open shard, read on demand."""

    def __init__(self, path: Path, handle):
        self.path = path
        self._handle = handle

    def keys(self) -> list[str]:
        """Tensor names in the order the file stores them."""
        keys = getattr(self._handle, "offset_keys", self._handle.keys)
        return list(keys())

    def metadata(self) -> dict[str, str]:
        """The shard's free-form header metadata."""
        return self._handle.metadata() or {}

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor."""
        try:
            return self._handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types; all mean a broken file here
            raise CompressorError(self.path, f"cannot read tensor {name!r} ({e})") from None


class _PickleHandle:
    # Same calls as safe_open's handle, over a state dict the user allowed us to unpickle.
    def __init__(self, path: Path):
        self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._tensors = None

    def keys(self):
        return list(self._tensors)

    def metadata(self):
        return {}

    def get_tensor(self, name):
        return self._tensors[name].contiguous()


@contextmanager
def open_shard(path: Path) -> Iterator[ShardReader]:
    """Open a shard for reading, turning format errors into one-line messages.

    ``.bin`` shards are unpickled with ``weights_only=True``; :func:`find_checkpoint` only returns
    them when the user allowed pickles.
    """
    if path.suffix == ".bin":
        try:
            handle = _PickleHandle(path)
        except Exception as e:
            raise CompressorError(path, f"cannot load pickled weights ({e})") from None
        with handle:
            yield ShardReader(path, handle)
        return
    try:
        handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except Exception as e:
        raise CompressorError(path, f"not a valid safetensors file ({e})") from None
    with handle:
        yield ShardReader(path, handle)
