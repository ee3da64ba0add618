import pytest
import torch

from serve.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def backend(bases):
    return TorchBackend(bases["nf4"])


def test_decoding_after_a_prompt_gives_the_logits_of_the_whole_sequence_at_once(backend):
    ids = [5, 17, 42, 8, 99, 3]
    whole = backend.prompt_forward(ids, None, backend.new_cache(len(ids)), logits_to_keep=0)
    cache = backend.new_cache(4, limit=len(ids))
    last = backend.prompt_forward(ids[:4], None, cache, logits_to_keep=1)
    steps = [backend.decode([t], [None], [cache])[0] for t in ids[4:]]
    assert last.shape == (1, whole.shape[1]) and cache.length == len(ids)
    torch.testing.assert_close(torch.stack([last[0], *steps]), whole[3:], rtol=0, atol=1e-4)


def test_a_decode_step_gives_each_sequence_the_bits_it_gets_alone(backend):
    prompts = [[5, 17, 42], [8, 99, 3, 61, 7, 2, 30]]

    def cache_after(ids):
        cache = backend.new_cache(len(ids) + 1)
        backend.prompt_forward(ids, None, cache, logits_to_keep=1)
        return cache

    alone = [backend.decode([11], [None], [cache_after(p)])[0] for p in prompts]
    together = backend.decode([11, 11], [None, None], [cache_after(p) for p in prompts])
    assert torch.equal(together, torch.stack(alone))


def test_a_sliding_model_sizes_its_caches_as_rings_of_the_window_and_the_prefill_chunk(tmp_path):
    from tests.helpers import tiny_checkpoint, with_tokenizer

    backend = TorchBackend(with_tokenizer(tiny_checkpoint(tmp_path, "mistral-window")), slack=6)  # every layer: a window of 4
    shape = backend.kv_shape
    assert shape.windows == (4, 4) and shape.ring(0) == 10
    per_position = 2 * shape.kv_heads * shape.head_dim * 4
    assert shape.bytes(100) == 2 * 10 * per_position and shape.bytes(7) == 2 * 7 * per_position
    cache = backend.new_cache(4, limit=100)
    backend.prompt_forward(list(range(5, 25)), None, cache, logits_to_keep=1)  # in pieces of 6 around the ring
    assert cache.length == 20 and [k.shape[1] for k in cache.keys] == [10, 10]
