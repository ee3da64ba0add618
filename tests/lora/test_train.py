import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from compressor import memory
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.lora.train import TrainJob, train
from tests.helpers import ANSWER_FORMAT, nf4_twin


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    nf4_twin(root)
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in ANSWER_FORMAT) + "\n")
    return root


def job(base, out, **kw):
    options = dict(rank=4, alpha=8, dropout=0.0, lr=1e-2, steps=30, batch_size=4, seq_len=32, eval_split=0.2, eval_every=10, progress=False)
    return TrainJob(base / "nf4", base / "data.jsonl", out, **{**options, **kw})


def test_training_on_the_packed_base_lowers_train_and_held_out_loss(base, tmp_path):
    summary = train(job(base, tmp_path / "a"))
    assert summary.train_losses[-1] < 0.5 * summary.train_losses[0]
    assert summary.eval_losses[-1][1] < 0.7 * summary.eval_losses[0][1]
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert summary.trainable_params < 0.1 * summary.base_params


def test_the_same_seed_trains_the_same_adapter(base, tmp_path):
    train(job(base, tmp_path / "a", steps=5))
    train(job(base, tmp_path / "b", steps=5))
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_two_data_parallel_processes_reach_the_loss_of_one_with_the_same_global_batch(base, tmp_path):
    single = train(job(base, tmp_path / "one", steps=6, grad_accum=2))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "compressor", "train", str(base / "nf4"),
           "--data", str(base / "data.jsonl"), "--out", str(tmp_path / "two"), "--rank", "4", "--alpha", "8", "--dropout", "0",
           "--lr", "1e-2", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-split", "0.2", "--eval-every", "10",
           "--quiet"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = float(next(line for line in done.stdout.splitlines() if line.startswith("train loss")).split("->")[1])
    assert final == pytest.approx(single.train_losses[-1], rel=1e-3, abs=1e-4)


def test_auto_rank_is_said_in_the_summary(base, tmp_path, capsys):
    args = ["train", str(base / "nf4"), "--data", str(base / "data.jsonl"), "--out", str(tmp_path / "a"), "--rank", "auto",
            "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "rank                8 (auto: " in capsys.readouterr().out


def test_a_batch_that_does_not_split_over_the_accumulation_steps_is_an_error(base, tmp_path):
    with pytest.raises(CompressorError, match="batch size 5 does not split"):
        train(job(base, tmp_path / "a", batch_size=5, grad_accum=2))


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_chunked_loss_equals_the_loss_over_full_logits_with_the_same_gradients(arch, monkeypatch):
    import torch
    import torch.nn.functional as F

    from compressor.lora import LoraConfig, add_lora, head_loss
    from compressor.lora import train as train_module
    from compressor.lora.data import IGNORE
    from tests.helpers import tiny_model

    model = tiny_model(arch)
    add_lora(model, LoraConfig(rank=4, alpha=8))
    for m in model.modules():  # B starts at zero; a random B makes the adapter's gradients comparable
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    ids = torch.randint(0, 320, (3, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :15] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    monkeypatch.setattr(head_loss, "LOGIT_ELEMENTS", 75 * 50)  # 75 positions: slices of 50 of the 320 rows, the last ragged

    chunked = train_module._loss_sum(model, batch)
    chunked.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    full = F.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")
    full.backward()

    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-4)  # summation order differs


def test_checkpointing_reuses_the_recomputed_weight_and_trains_the_same_adapter(base, tmp_path):
    plain = train(job(base, tmp_path / "plain", steps=4, dropout=0.1))
    checkpointed = train(job(base, tmp_path / "ckpt", steps=4, dropout=0.1, gradient_checkpointing=True))
    assert checkpointed.train_losses == pytest.approx(plain.train_losses, rel=1e-5)
    a, b = load_file(tmp_path / "plain" / "adapter_model.safetensors"), load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_with_checkpointing_each_weight_is_decoded_twice_a_step_and_a_layers_last_product_is_not_recomputed(base, tmp_path, monkeypatch):
    from compressor.lora import product
    from compressor.nn import QuantLinear

    decoded, multiplied = Counter(), Counter()
    real_decode, real_forward = QuantLinear.weight_dequantized, product._AdaptedProduct.forward

    def decode(self, dtype=None):
        decoded[self] += 1
        return real_decode(self, dtype)

    def forward(ctx, x, h, b, module, *rest):
        multiplied[module] += 1
        return real_forward(ctx, x, h, b, module, *rest)

    monkeypatch.setattr(QuantLinear, "weight_dequantized", decode)
    monkeypatch.setattr(product._AdaptedProduct, "forward", staticmethod(forward))
    train(job(base, tmp_path / "a", steps=3, dropout=0.1, gradient_checkpointing=True, eval_split=0.0))
    downs = {m for m in decoded if m.in_features == 128}  # down_proj, the only product from the intermediate size
    assert len(downs) == 2 and len(decoded) == 14
    assert set(decoded.values()) == {6}  # forward and recomputation, or (the last product) forward and backward
    assert {multiplied[m] for m in downs} == {3} and {n for m, n in multiplied.items() if m not in downs} == {6}


def test_kept_layers_are_not_recomputed_and_train_the_same_adapter(base, tmp_path, monkeypatch):
    from compressor.lora import product

    multiplied = Counter()
    real_forward = product._AdaptedProduct.forward

    def forward(ctx, x, h, b, module, *rest):
        multiplied[module] += 1
        return real_forward(ctx, x, h, b, module, *rest)

    monkeypatch.setattr(product._AdaptedProduct, "forward", staticmethod(forward))
    plain = train(job(base, tmp_path / "plain", steps=3, dropout=0.1, eval_split=0.0))
    multiplied.clear()
    kept = train(job(base, tmp_path / "kept", steps=3, dropout=0.1, gradient_checkpointing=True, keep_layers=1, eval_split=0.0))
    assert kept.train_losses == pytest.approx(plain.train_losses, rel=1e-5)
    # The first layer recomputes all but its last product; the kept second layer recomputes none.
    assert sorted(multiplied.values()) == [3] * 8 + [6] * 6  # 7 kept, 1 last product; 6 recomputed
    a, b = load_file(tmp_path / "plain" / "adapter_model.safetensors"), load_file(tmp_path / "kept" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_keeping_layers_without_checkpointing_is_an_error(base, tmp_path):
    with pytest.raises(ValueError, match="keep_layers applies to gradient checkpointing only"):
        job(base, tmp_path / "a", keep_layers=2)


def test_bfloat16_compute_follows_the_float32_loss_curve(base, tmp_path):
    exact = train(job(base, tmp_path / "f32", steps=12))
    rounded = train(job(base, tmp_path / "bf16", steps=12, compute="bfloat16"))
    assert rounded.train_losses[-1] < 0.7 * rounded.train_losses[0]
    # At this learning rate a step's loss moves by up to 2% with the order of a float32 sum alone
    # (computing B's gradient as (h.T @ g).T rather than g.T @ h did), so bfloat16 is held to 3%.
    assert rounded.train_losses == pytest.approx(exact.train_losses, rel=0.03)


def test_bfloat16_compute_on_a_float_base_multiplies_only_its_linear_layers_in_bfloat16(base, tmp_path, monkeypatch):
    attention_dtypes = set()
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        attention_dtypes.add(q.dtype)
        return real(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    float_base = base / "llama-float32"
    summary = train(TrainJob(float_base, base / "data.jsonl", tmp_path / "a", rank=4, alpha=8, lr=1e-2, steps=12, batch_size=4, seq_len=32,
                             eval_split=0.0, compute="bfloat16", progress=False))  # fmt: skip
    assert summary.train_losses[-1] < 0.7 * summary.train_losses[0]
    assert attention_dtypes == {torch.float32}


@pytest.fixture(scope="module")
def bf16_base(base):
    from compressor.formats import config_for
    from compressor.quantize import QuantizeJob, quantize_checkpoint
    from tests.helpers import tiny_checkpoint, with_tokenizer

    src = with_tokenizer(tiny_checkpoint(base, dtype=torch.bfloat16))
    quantize_checkpoint(QuantizeJob(src, base / "nf4-bf16", config_for("nf4"), progress=False))
    return base / "nf4-bf16"


def test_a_bfloat16_checkpoints_embedding_stays_bfloat16_and_trains_as_in_float32(base, bf16_base, tmp_path, monkeypatch):
    from compressor.lora import train as train_module

    kept = []
    real = train_module._frozen_in_bf16
    monkeypatch.setattr(train_module, "_frozen_in_bf16", lambda model: (kept.append(model.get_input_embeddings()), real(model)))
    run = dict(steps=6, dropout=0.1, gradient_checkpointing=True)
    lean = train(replace(job(base, tmp_path / "a", **run), base_dir=bf16_base))
    assert [e.weight.dtype for e in kept] == [torch.bfloat16]
    wide = train(replace(job(base, tmp_path / "b", **run), base_dir=bf16_base, frozen_bf16=False))
    assert lean.train_losses == pytest.approx(wide.train_losses, rel=1e-5)
    assert [loss for _, loss in lean.eval_losses] == pytest.approx([loss for _, loss in wide.eval_losses], rel=1e-5)


def test_a_float32_embedding_is_not_rounded_unless_asked(base, tmp_path, monkeypatch):
    from compressor.lora import train as train_module

    calls = []
    monkeypatch.setattr(train_module, "_frozen_in_bf16", calls.append)
    train(job(base, tmp_path / "a", steps=1, eval_split=0.0))
    assert calls == []


def test_profile_names_each_phase_and_the_recomputation(base, tmp_path):
    summary = train(job(base, tmp_path / "p", steps=2, gradient_checkpointing=True, profile=True, eval_split=0.0))
    ms = summary.profile.ms
    assert ms["forward"]["matmul"] > 0 and ms["backward: recompute"]["dequantize"] > 0 and ms["optimizer"]["other"] > 0
    assert ms["backward: gradients"]["dequantize"] < ms["backward: recompute"]["dequantize"]  # only each layer's last product
    assert any(line.startswith("backward: recompute") for line in summary.lines())


def test_metrics_json_holds_every_steps_loss_and_time(base, tmp_path):
    args = ["train", str(base / "nf4"), "--data", str(base / "data.jsonl"), "--out", str(tmp_path / "a"), "--steps", "3", "--batch-size", "2",
            "--seq-len", "16", "--quiet", "--metrics-json", str(tmp_path / "m.json")]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert len(metrics["train_losses"]) == 3 and len(metrics["step_seconds"]) == 3


def test_a_step_whose_every_tensor_comes_from_the_pool_trains_the_same(base, tmp_path, monkeypatch):
    plain = train(job(base, tmp_path / "plain", steps=4, dropout=0.1, gradient_checkpointing=True, eval_split=0.0))
    monkeypatch.setattr(memory, "POOLED_BYTES", 0)  # every pooled allocation, however small: a buffer reused too early would show
    pooled = train(job(base, tmp_path / "pooled", steps=4, dropout=0.1, gradient_checkpointing=True, eval_split=0.0))
    assert pooled.train_losses == plain.train_losses
