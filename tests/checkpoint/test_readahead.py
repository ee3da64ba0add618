import hashlib

import pytest
import torch

from compressor.checkpoint.readahead import ReadAhead
from compressor.checkpoint.reader import find_checkpoint, open_shard
from compressor.errors import CompressorError
from tests.helpers import tiny_checkpoint


def test_yields_every_tensor_in_file_order_and_hashes_each_shard(tmp_path):
    ckpt = find_checkpoint(tiny_checkpoint(tmp_path, shard_kb=100))
    expected = []
    for shard in ckpt.shards:
        with open_shard(shard) as reader:
            expected += [(shard, name, reader.get(name)) for name in reader.keys()]
    reads = ReadAhead(ckpt.shards, budget=1)  # the smallest budget still lets one tensor wait
    got = list(reads)
    reads.close()
    assert [(s, n) for s, n, _ in got] == [(s, n) for s, n, _ in expected]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(got, expected))
    for shard in ckpt.shards:
        assert reads.hashes[shard] == hashlib.sha256(shard.read_bytes()).hexdigest()


def test_read_errors_reach_the_consumer(tmp_path):
    src = tiny_checkpoint(tmp_path)
    ckpt = find_checkpoint(src)
    (src / "model.safetensors").write_bytes(b"garbage!" * 10)
    reads = ReadAhead(ckpt.shards, budget=1 << 20)
    with pytest.raises(CompressorError, match="not a valid safetensors file"):
        list(reads)
    reads.close()


def test_close_stops_a_reader_waiting_on_its_budget(tmp_path):
    ckpt = find_checkpoint(tiny_checkpoint(tmp_path))
    reads = ReadAhead(ckpt.shards, budget=1)
    next(iter(reads))
    reads.close()  # returns although most tensors were never taken


def test_released_buffers_hold_later_tensors_without_disturbing_kept_ones(tmp_path):
    ckpt = find_checkpoint(tiny_checkpoint(tmp_path))
    with open_shard(ckpt.shards[0]) as reader:
        expected = {name: reader.get(name) for name in reader.keys()}
    reads = ReadAhead(ckpt.shards, budget=1 << 30)
    got = {name: tensor for _, name, tensor in reads}
    reads.close()
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    # Hand one tensor back: the next allocation of at most its size reuses its memory (the reading
    # thread has finished, so this calls the allocator it uses directly) and the others stay intact.
    freed = got.pop("model.embed_tokens.weight")
    reads.release(freed)
    reused = reads._allocate((10, 64), torch.float32)
    assert reused.data_ptr() == freed.data_ptr()
    assert all(torch.equal(got[n], expected[n]) for n in got)
