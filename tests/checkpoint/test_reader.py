import pytest
import torch

from compressor.checkpoint.reader import find_checkpoint, open_shard
from compressor.errors import CompressorError
from tests.helpers import tiny_checkpoint


def test_finds_single_and_sharded_checkpoints(tmp_path):
    single = find_checkpoint(tiny_checkpoint(tmp_path))
    assert not single.sharded and len(single.shards) == 1
    sharded = find_checkpoint(tiny_checkpoint(tmp_path, shard_kb=100))
    assert sharded.sharded and len(sharded.shards) > 1


def test_reads_tensors_one_at_a_time(tmp_path):
    ckpt = find_checkpoint(tiny_checkpoint(tmp_path))
    with open_shard(ckpt.shards[0]) as reader:
        t = reader.get("model.embed_tokens.weight")
    assert t.shape == (320, 64) and t.dtype == torch.float32


def test_a_tensors_size_comes_from_the_header(tmp_path):
    ckpt = find_checkpoint(tiny_checkpoint(tmp_path, dtype=torch.bfloat16))
    with open_shard(ckpt.shards[0]) as reader:
        assert all(reader.nbytes(name) == reader.get(name).nbytes for name in reader.keys())
        assert reader.nbytes("model.embed_tokens.weight") == 320 * 64 * 2


def test_missing_folder_and_config_are_named(tmp_path):
    with pytest.raises(CompressorError, match="no such folder"):
        find_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompressorError, match="config.json: missing file"):
        find_checkpoint(tmp_path / "empty")


def test_pickle_is_refused_unless_allowed(tmp_path):
    src = tiny_checkpoint(tmp_path)
    (src / "model.safetensors").unlink()
    torch.save({"x": torch.ones(2)}, src / "pytorch_model.bin")
    with pytest.raises(CompressorError, match="pytorch_model.bin: weights are a pickle"):
        find_checkpoint(src)
    ckpt = find_checkpoint(src, allow_pickle=True)
    with open_shard(ckpt.shards[0]) as reader:
        assert torch.equal(reader.get("x"), torch.ones(2))


def test_truncated_file_is_named(tmp_path):
    src = tiny_checkpoint(tmp_path)
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CompressorError, match="model.safetensors: not a valid safetensors file"):
        with open_shard(find_checkpoint(src).shards[0]):
            pass


def test_pickle_disguised_as_safetensors_is_named(tmp_path):
    src = tiny_checkpoint(tmp_path)
    torch.save({"x": torch.ones(2)}, src / "model.safetensors")
    with pytest.raises(CompressorError, match="is a pickle, not a safetensors file"):
        find_checkpoint(src)


def test_missing_shard_is_named(tmp_path):
    src = tiny_checkpoint(tmp_path, shard_kb=100)
    victim = sorted(src.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CompressorError, match=f"{victim.name}: missing file"):
        find_checkpoint(src)
