import torch

from serve.sampling import generator_for, pick
from serve.types import SamplingParams


def test_greedy_takes_the_largest_logit():
    assert pick(torch.tensor([0.1, 3.0, -1.0]), SamplingParams(), None) == 1


def test_a_seed_fixes_the_samples():
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.0, seed=7)
    first = [pick(logits, params, g) for g in [generator_for(params)] for _ in range(20)]
    again = [pick(logits, params, g) for g in [generator_for(params)] for _ in range(20)]
    assert first == again and len(set(first)) > 1


def test_top_p_only_samples_from_the_nucleus():
    logits = torch.tensor([5.0, 4.5, 0.0, -1.0, -2.0])  # the first two hold ~99% of the mass
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=0)
    gen = generator_for(params)
    assert {pick(logits, params, gen) for _ in range(200)} == {0, 1}
