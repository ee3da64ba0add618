"""Read (and hash) every tensor of a checkpoint in file order on a background thread.

The compressor starts reading before it has imported transformers and planned which modules to
quantize: that import keeps one core busy for seconds, while ``os.preadv`` and sha256 release the
GIL and run on the other. Reading ahead is bounded by a byte budget, so memory stays far below the
checkpoint's size however slow the consumer is.

Tensors are read into recycled buffers: a consumer that is done with a tensor hands it back with
:meth:`ReadAhead.release`. Reading into memory the process already touched is about four times
faster than into fresh pages, which the kernel must first fault in and zero.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch

from .hashing import ShardHash, sha256_file
from .reader import open_shard


class ReadAhead:
    """Iterate ``(shard, name, tensor)`` over ``shards`` in file order; :attr:`hashes` is complete at the end.

    Args:
        shards: the files, in the order to read them.
        budget: bytes of tensors that may wait, read but not yet taken (one tensor always may).
    """

    def __init__(self, shards: tuple[Path, ...], budget: int):
        self.hashes: dict[Path, str] = {}
        self._shards = shards
        self._budget = budget
        self._ready: deque = deque()
        self._waiting_bytes = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._free: list[torch.Tensor] = []  # recycled uint8 buffers
        self._lent: dict[int, torch.Tensor] = {}  # data pointer of a handed-out tensor -> its buffer
        self._pool_lock = threading.Lock()
        self._thread = threading.Thread(target=self._read_all, name="readahead", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[Path, str, torch.Tensor]]:
        while True:
            with self._cond:
                while not self._ready:
                    self._cond.wait()
                item = self._ready.popleft()
                if isinstance(item, tuple):
                    self._waiting_bytes -= item[2].nbytes
                    self._cond.notify_all()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, tensor: torch.Tensor) -> None:
        """Hand back a tensor this iterator yielded; its memory will hold a later one. Do not use it after."""
        with self._pool_lock:
            buffer = self._lent.pop(tensor.data_ptr(), None)
            # Keep at most a budget's worth of free buffers, so the pool never outgrows the read-ahead.
            if buffer is not None and buffer.numel() + sum(b.numel() for b in self._free) <= self._budget:
                self._free.append(buffer)

    def _allocate(self, shape, dtype) -> torch.Tensor:
        # Best fit among the free buffers, else a new one.
        nbytes = torch.Size(shape).numel() * dtype.itemsize  # of the tensor about to be read
        with self._pool_lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            best = min(fits, key=lambda i: self._free[i].numel()) if fits else None
            buffer = self._free.pop(best) if best is not None else None
        if buffer is None:
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        tensor = buffer[:nbytes].view(dtype).reshape(shape)
        with self._pool_lock:
            self._lent[tensor.data_ptr()] = buffer
        return tensor

    def close(self) -> None:
        """Stop reading and wait for the thread (safe to call at any point)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    def _put(self, item) -> bool:
        size = item[2].nbytes if isinstance(item, tuple) else 0
        with self._cond:
            while self._waiting_bytes and self._waiting_bytes + size > self._budget and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return False
            self._ready.append(item)
            self._waiting_bytes += size
            self._cond.notify_all()
            return True

    def _read_all(self) -> None:
        try:
            for shard in self._shards:
                with open_shard(shard) as reader:
                    header = reader.raw_header()
                    source_hash = ShardHash(shard, header) if header is not None else None
                    for name in reader.keys():
                        tensor = reader.get(name, self._allocate)
                        if source_hash is not None:
                            source_hash.feed(tensor)
                        if not self._put((shard, name, tensor)):
                            return
                self.hashes[shard] = source_hash.hexdigest() if source_hash is not None else sha256_file(shard)
            self._put(None)
        except BaseException as e:  # handed to the consumer, which raises it in its own thread
            self._put(e)
