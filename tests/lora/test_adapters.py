import json

import pytest
import torch

from compressor.errors import CompressorError
from compressor.formats import config_for
from compressor.lora import LoraConfig, add_lora
from compressor.lora.adapters import apply_adapter, base_fingerprint, read_adapter, save_adapter
from compressor.quantize import QuantizeJob, quantize_checkpoint
from tests.helpers import tiny_checkpoint, tiny_model, token_batch


def trained_adapter(tmp_path, base_dir, cfg=LoraConfig(rank=4, alpha=8, targets=("q_proj", "down_proj"))):
    """An adapter with non-zero B (as after training) saved for ``base_dir``; returns its folder and logits."""
    model = tiny_model()
    modules = add_lora(model, cfg)
    with torch.no_grad():
        for m in modules.values():
            m.lora_B.weight.normal_(std=0.5)
        logits = model(token_batch()).logits
    return save_adapter(modules, cfg, tmp_path / "adapter", base_dir), logits


def test_peft_loads_our_adapter_and_computes_our_logits(tmp_path):
    from peft import PeftModel

    src = tiny_checkpoint(tmp_path)
    adapter_dir, ours = trained_adapter(tmp_path, src)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(tiny_model(), adapter_dir).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(token_batch()).logits, ours, atol=1e-5)


def test_we_load_an_adapter_peft_trained(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(tiny_model(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    model = tiny_model()
    apply_adapter(model, read_adapter(tmp_path / "peft"))
    with torch.no_grad():
        assert torch.allclose(model(token_batch()).logits, peft_model.eval()(token_batch()).logits, atol=1e-5)


def test_a_quantized_base_and_its_float_source_share_a_fingerprint_and_other_weights_do_not(tmp_path):
    src = tiny_checkpoint(tmp_path)
    quantize_checkpoint(QuantizeJob(src, tmp_path / "nf4", config_for("nf4"), progress=False))
    other = tiny_checkpoint(tmp_path, "qwen2")
    assert base_fingerprint(tmp_path / "nf4") == base_fingerprint(src) != base_fingerprint(other)


def test_an_adapter_is_refused_on_a_base_made_from_other_weights(tmp_path):
    src = tiny_checkpoint(tmp_path)
    adapter_dir, _ = trained_adapter(tmp_path, src)
    other = tmp_path / "other"
    tiny_model(seed=1).save_pretrained(other)
    with pytest.raises(CompressorError, match="trained on a base made from other weights"):
        apply_adapter(tiny_model(seed=1), read_adapter(adapter_dir), base_dir=other)


def test_shapes_that_do_not_fit_are_refused_before_anything_changes(tmp_path):
    src = tiny_checkpoint(tmp_path)
    adapter_dir, _ = trained_adapter(tmp_path, src)
    adapter = read_adapter(adapter_dir)
    name = next(iter(adapter.weights))
    a, b = adapter.weights[name]
    adapter.weights[name] = (a[:, :-1], b)
    model = tiny_model()
    with pytest.raises(CompressorError, match="do not fit"):
        apply_adapter(model, adapter)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_a_pickled_adapter_is_refused_unless_allowed(tmp_path):
    src = tiny_checkpoint(tmp_path)
    adapter_dir, _ = trained_adapter(tmp_path, src)
    weights = read_adapter(adapter_dir).weights
    torch.save({f"base_model.model.{n}.lora_{ab}.weight": t for n, (a, b) in weights.items() for ab, t in (("A", a), ("B", b))},
               adapter_dir / "adapter_model.bin")  # fmt: skip
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(CompressorError, match="adapter_model.bin: adapter weights are a pickle"):
        read_adapter(adapter_dir)
    assert read_adapter(adapter_dir, allow_pickle=True).weights.keys() == weights.keys()
