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
