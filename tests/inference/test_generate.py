import pytest
import torch
from torch import nn
from transformers import DynamicCache

import compressor
from tests.helpers import FAMILIES, tiny_checkpoint, tiny_model

GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0, max_new_tokens=8, min_new_tokens=8)
PROMPT = torch.tensor([[5, 17, 42, 8, 9, 10, 61, 7, 2, 30]])


def both(folder):
    return compressor.load(folder), compressor.load(folder, native_generate=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_through_the_native_step_gives_the_models_own_tokens_and_logits(tmp_path, family):
    native, own = both(tiny_checkpoint(tmp_path, arch=family))
    with torch.inference_mode():
        assert torch.equal(native.generate(PROMPT, **GREEDY), own.generate(PROMPT, **GREEDY))
        torch.testing.assert_close(native(PROMPT, cache=DynamicCache()).logits, own(PROMPT).logits, rtol=0, atol=1e-4)
    assert native._native_generation.decoder is not None  # the step did run


def test_a_packed_model_generates_its_own_tokens_through_the_step(bases):
    native, own = both(bases["nf4"])
    with torch.inference_mode():
        assert torch.equal(native.generate(PROMPT, **GREEDY), own.generate(PROMPT, **GREEDY))


def test_calls_the_step_does_not_compute_go_to_the_models_own_forward(tmp_path):
    native, own = both(tiny_checkpoint(tmp_path))
    assert native(PROMPT).logits.requires_grad  # gradients: the model's modules
    with torch.inference_mode():
        padded = torch.ones_like(PROMPT)
        padded[0, 0] = 0
        torch.testing.assert_close(native(PROMPT, attention_mask=padded, cache=DynamicCache()).logits,
                                   own(PROMPT, attention_mask=padded).logits)  # fmt: skip
        assert native(PROMPT).logits.shape == own(PROMPT).logits.shape  # no cache: the model's full forward


class Shifted(nn.Module):
    """A layer replaced after loading, as PEFT's LoRA layers replace theirs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1.0


def test_a_layer_replaced_after_loading_is_honoured_by_its_own_forward(tmp_path):
    native, own = both(tiny_checkpoint(tmp_path))
    with torch.inference_mode():
        native.generate(PROMPT, **GREEDY)  # planned for the loaded layers
        for model in (native, own):
            model.model.layers[1].mlp.down_proj = Shifted(model.model.layers[1].mlp.down_proj)
        assert torch.equal(native.generate(PROMPT, **GREEDY), own.generate(PROMPT, **GREEDY))
    assert "Shifted" in native._native_generation.refused


def test_assisted_generation_crops_the_native_keys_with_its_cache(tmp_path):
    native, own = both(tiny_checkpoint(tmp_path))
    tiny_model(seed=1).save_pretrained(tmp_path / "helper")  # other weights: most candidates rejected, the cache cropped back
    helper = compressor.load(tmp_path / "helper", native_generate=False)
    with torch.inference_mode():
        assert torch.equal(native.generate(PROMPT, assistant_model=helper, **GREEDY), own.generate(PROMPT, **GREEDY))
