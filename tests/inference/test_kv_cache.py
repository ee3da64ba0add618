import pytest
import torch

from compressor.inference.kv_cache import CacheShape, SequenceKV


def test_a_cache_grows_by_doubling_up_to_its_limit_and_keeps_what_it_holds():
    cache = SequenceKV(CacheShape(2, 1, 4), torch.float32, capacity=2, limit=7)
    for layer in range(2):
        cache.keys[layer][:, :2] = torch.arange(8.0).view(1, 2, 4) + layer
    cache.length = 2
    cache.reserve(3)
    assert [k.shape[1] for k in cache.keys] == [4, 4]
    assert torch.equal(cache.keys[1][:, :2], torch.arange(8.0).view(1, 2, 4) + 1)
    cache.reserve(6)
    assert [k.shape[1] for k in cache.keys + cache.values] == [7] * 4  # 8 would pass the limit


def test_a_sliding_layer_holds_a_ring_of_its_window_and_slack_and_a_full_layer_every_position():
    shape = CacheShape(2, 1, 4, windows=(3, 0), slack=2)
    cache = SequenceKV(shape, torch.float32, capacity=2)
    for length in range(1, 20):
        cache.reserve(length)
        cache.length = length
    assert [k.shape[1] for k in cache.keys] == [5, 32]
    assert shape.positions(19) == 5 + 19 and shape.bytes(19) == 2 * (5 + 19) * 4 * 4


def test_one_forward_may_not_write_more_than_the_slack_into_a_wrapped_ring():
    cache = SequenceKV(CacheShape(1, 1, 4, windows=(3,), slack=2), torch.float32)
    cache.reserve(5)  # fits the ring (3 + 2) whole
    cache.length = 5
    with pytest.raises(ValueError, match="overwrite keys"):
        cache.reserve(8)


def test_a_crop_back_past_what_a_ring_keeps_is_refused():
    cache = SequenceKV(CacheShape(1, 1, 4, windows=(3,), slack=2), torch.float32)
    for length in range(1, 11):
        cache.reserve(length)
        cache.length = length
    cache.crop(7)  # the slack and one more: the window of position 7 is still there
    assert cache.length == 7
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(6)
