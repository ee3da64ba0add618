import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compressor
from compressor.errors import CompressorError
from compressor.lora import LoraConfig, add_lora
from compressor.lora.adapters import apply_adapter, read_adapter, save_adapter
from compressor.lora.merge import MergeJob, merge
from tests.helpers import TEXT, nf4_twin, tiny_model, token_batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    nf4_twin(root)
    cfg = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    model = compressor.load(root / "nf4", float32=True)
    modules = add_lora(model, cfg)
    with torch.no_grad():
        for m in modules.values():
            m.lora_B.weight.normal_(std=0.3)
    save_adapter(modules, cfg, root / "adapter", root / "nf4")
    (root / "text.txt").write_text(TEXT)
    return root


def base_plus_adapter(base_dir, adapter_dir):
    model = compressor.load(base_dir, float32=True)
    apply_adapter(model, read_adapter(adapter_dir), base_dir)
    return model.eval()


def test_merging_into_a_float_base_computes_what_base_plus_adapter_computes(setup, tmp_path):
    src = next(p for p in setup.iterdir() if p.name.startswith("llama"))
    merge(MergeJob(src, setup / "adapter", tmp_path / "merged", progress=False))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(token_batch()).logits
        assert torch.allclose(merged, base_plus_adapter(src, setup / "adapter")(token_batch()).logits, atol=1e-4)


def test_merging_a_packed_base_to_float32_keeps_the_adapter_exactly(setup, tmp_path):
    summary = merge(MergeJob(setup / "nf4", setup / "adapter", tmp_path / "merged", to="float32", progress=False))
    assert summary.modules_merged == 6 and summary.requantized is None
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(token_batch()).logits
        assert torch.allclose(merged, base_plus_adapter(setup / "nf4", setup / "adapter")(token_batch()).logits, atol=1e-4)


def test_merging_into_the_same_format_reports_what_re_quantizing_costs(setup, tmp_path):
    summary = merge(MergeJob(setup / "nf4", setup / "adapter", tmp_path / "merged", text=setup / "text.txt", windows=2, seq_len=64, progress=False))
    assert summary.written_as == "nf4" and summary.requantized.worst_rms_error > 0
    assert summary.perplexity_merged > 1 and summary.kl > 0 and 0 < summary.agreement <= 1
    # The folder is an ordinary bitsandbytes NF4 checkpoint.
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    assert type(stock.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_an_adapter_for_other_weights_is_refused_and_nothing_is_written(setup, tmp_path):
    other = tmp_path / "other"
    tiny_model(seed=1).save_pretrained(other)
    with pytest.raises(CompressorError, match="other weights"):
        merge(MergeJob(other, setup / "adapter", tmp_path / "merged", progress=False))
    assert not (tmp_path / "merged").exists()


def test_merging_the_same_way_into_a_folder_without_a_manifest_is_refused_before_anything_is_written(setup, tmp_path):
    import shutil

    bnb_folder = tmp_path / "bnb"  # as transformers + bitsandbytes write it: no manifest
    shutil.copytree(setup / "nf4", bnb_folder)
    (bnb_folder / "manifest.json").unlink()
    cfg = LoraConfig(rank=2, targets=("q_proj",))
    save_adapter(add_lora(compressor.load(bnb_folder, float32=True), cfg), cfg, tmp_path / "adapter", bnb_folder)
    with pytest.raises(CompressorError, match=r"manifest\.json: no manifest: merge --to same needs a folder written by 'compressor quantize'"):
        merge(MergeJob(bnb_folder, tmp_path / "adapter", tmp_path / "merged", progress=False))
    assert not (tmp_path / "merged").exists()
