import torch

from compressor.inference.kv_cache import SequenceKV


def test_a_cache_grows_by_doubling_up_to_its_limit_and_keeps_what_it_holds():
    cache = SequenceKV(2, 1, 4, torch.float32, capacity=2, limit=7)
    for layer in range(2):
        cache.keys[layer][:, :2] = torch.arange(8.0).view(1, 2, 4) + layer
    cache.length = 2
    cache.reserve(3)
    assert [k.shape[1] for k in cache.keys] == [4, 4]
    assert torch.equal(cache.keys[1][:, :2], torch.arange(8.0).view(1, 2, 4) + 1)
    cache.reserve(6)
    assert [k.shape[1] for k in cache.keys + cache.values] == [7] * 4  # 8 would pass the limit
