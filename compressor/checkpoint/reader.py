"""Find and open the safetensors shards of a Hugging Face checkpoint, one tensor at a time.

``safe_open`` validates each shard. Tensors are then read with ``os.preadv`` at the offsets of the
header rather than memory-mapped or read through ``safe_open``: a mapping would leave every page of
the checkpoint in our resident set as we pass over it, and ``safe_open``'s own ``pread`` holds the
GIL, which would stop a reading thread from running beside the Python that plans and quantizes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CompressorError
from .dtypes import SAFETENSORS_TO_TORCH, raw_bytes

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


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the safetensors files of a checkpoint folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


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
    elif any(root.glob("*.onnx")):
        raise CompressorError(root, f"holds an ONNX model, not a safetensors checkpoint (no {SINGLE}); give the folder it was exported from")
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
        return list(self._handle.keys())

    def metadata(self) -> dict[str, str]:
        """The shard's free-form header metadata."""
        return self._handle.metadata() or {}

    def raw_header(self) -> bytes | None:
        """The file's bytes before the first tensor (length and JSON header); None for a pickle."""
        return self._handle.raw_header()

    def nbytes(self, name: str) -> int:
        """Bytes of one stored tensor, without reading it."""
        return self._handle.nbytes(name)

    def get(self, name: str, allocate=torch.empty) -> torch.Tensor:
        """Read one tensor; ``allocate(shape, dtype=...)`` provides its memory (a fresh tensor by default)."""
        try:
            return self._handle.get_tensor(name, allocate)
        except Exception as e:  # safetensors raises its own error types; all mean a broken file here
            raise CompressorError(self.path, f"cannot read tensor {name!r} ({e})") from None


class _SafetensorsHandle:
    # safe_open checks the file (header, sizes, coverage); reads go through os.preadv.
    def __init__(self, path: Path):
        self._path = path
        with safe_open(str(path), framework="pt", device="cpu", backend="pread"):
            pass  # opening is the check
        self._fd = os.open(path, os.O_RDONLY)
        (length,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        header = json.loads(os.pread(self._fd, length, 8))
        self._metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + length

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self._fd)

    def keys(self):
        return sorted(self._entries, key=lambda name: self._entries[name]["data_offsets"][0])

    def metadata(self):
        return self._metadata

    def raw_header(self):
        return os.pread(self._fd, self._data_start, 0)

    def nbytes(self, name):
        begin, end = self._entries[name]["data_offsets"]
        return end - begin

    def get_tensor(self, name, allocate):
        entry = self._entries[name]
        if entry["dtype"] not in SAFETENSORS_TO_TORCH:
            raise ValueError(f"unsupported dtype {entry['dtype']}")
        tensor = allocate(entry["shape"], dtype=SAFETENSORS_TO_TORCH[entry["dtype"]])
        begin, end = entry["data_offsets"]
        view = raw_bytes(tensor)  # the tensor is freshly allocated, so this is its own memory
        if len(view) != end - begin:
            raise ValueError(f"{end - begin} bytes for a {entry['dtype']} tensor of shape {entry['shape']}")
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], self._data_start + begin + done)
            if got <= 0:
                raise ValueError("file ends inside the tensor")
            done += got
        return tensor


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

    def raw_header(self):
        return None

    def nbytes(self, name):
        return self._tensors[name].nbytes

    def get_tensor(self, name, allocate):
        return self._tensors[name].contiguous()


@contextmanager
def open_shard(path: Path) -> Iterator[ShardReader]:
    """Open a shard for reading, turning format errors into one-line messages.

    ``.bin`` shards are unpickled with ``weights_only=True``; :func:`find_checkpoint` only returns
    them when the user allowed pickles.
    """
    pickled = path.suffix == ".bin"
    try:
        handle = _PickleHandle(path) if pickled else _SafetensorsHandle(path)
    except Exception as e:
        problem = "cannot load pickled weights" if pickled else "not a valid safetensors file"
        raise CompressorError(path, f"{problem} ({e})") from None
    with handle:
        yield ShardReader(path, handle)
