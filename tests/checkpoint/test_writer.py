import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compressor.checkpoint.writer import ShardWriter


def test_written_file_reads_back_with_safetensors(tmp_path):
    tensors = {
        "a": torch.arange(7, dtype=torch.uint8),
        "b": torch.randn(3, 5),
        "c": torch.randn(4, dtype=torch.bfloat16),
        "scalar": torch.tensor(3, dtype=torch.uint8),
        "ints": torch.arange(6, dtype=torch.int32).reshape(2, 3),
    }
    writer = ShardWriter(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finish({"format": "pt", "note": "hi"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_header_larger_than_its_reservation_moves_the_data(tmp_path):
    writer = ShardWriter(tmp_path / "x.safetensors", header_reserve=16)
    tensors = {f"tensor.with.a.long.name.{i}": torch.randn(i + 1) for i in range(50)}
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finish({"format": "pt"})
    header_len = int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0 and header_len > 16
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_abort_leaves_nothing(tmp_path):
    writer = ShardWriter(tmp_path / "x.safetensors")
    writer.add("a", torch.ones(3))
    writer.abort()
    assert list(tmp_path.iterdir()) == []
