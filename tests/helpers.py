"""Tiny models built from a config with a fixed seed, so tests need no download."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Tokenizer,
    Qwen3Config,
)

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=64),
}
# Every family users run, each with its own features small enough for a test's prompts to reach
# them (windows of 4 tokens).
FAMILIES = {
    **CONFIGS,
    "qwen2-sliding": lambda: Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=16, sliding_window=4, attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
    "gemma3": lambda: Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "mistral-window": lambda: MistralConfig(**_COMMON, sliding_window=4),
    "phi3": lambda: Phi3Config(**_COMMON, pad_token_id=0, eos_token_id=2, bos_token_id=1, sliding_window=4),
}


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised causal LM of family ``arch``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[arch]()).to(dtype)
    # Random init leaves some weights tiny; scale them up so quantization error is visible.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def tiny_checkpoint(root: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, shard_kb: int | None = None) -> Path:
    """Save :func:`tiny_model` under ``root / arch`` (sharded when ``shard_kb`` is set) and return the folder."""
    out = root / f"{arch}-{str(dtype).removeprefix('torch.')}{'-sharded' if shard_kb else ''}"
    kwargs = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    tiny_model(arch, dtype).save_pretrained(out, **kwargs)
    return out


def token_batch(vocab: int = 320, seed: int = 0) -> torch.Tensor:
    """A fixed batch of token ids, ``(2, 24)``."""
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def tiny_gguf(path: Path, seed: int = 0, tokenizer: str = "gpt2", architecture: str = "llama") -> Path:
    """Write a tiny Llama GGUF file (one Q8_0 tensor) and return its path.

    ``tokenizer`` is ``"gpt2"`` (byte-level BPE) or ``"llama"`` (sentencepiece-style: scores, byte
    tokens, unk/bos/eos/pad ids; llama.cpp's converter reads it back without having to recognise
    the vocabulary). ``architecture`` only changes the name the file gives its architecture.
    """
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    hidden, ffn, layers, heads, kv_heads = 64, 128, 2, 4, 2
    if tokenizer == "llama":
        tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), "▁t", "he", "▁the", "▁"]
    else:
        tokens = [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_token_list(tokens)
    if tokenizer == "llama":
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([0.0] * 259 + [-1.0, -2.0, -0.5, -3.0])
        writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * 4)  # unknown, control, byte, normal
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(0)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_types([1] * (len(tokens) - 1) + [3])
        writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
        writer.add_bos_token_id(len(tokens) - 1)
        writer.add_eos_token_id(len(tokens) - 1)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    embedding = weight(len(tokens), hidden)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(embedding, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    kv = hidden // heads * kv_heads
    for i in range(layers):
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))]:  # fmt: skip
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output.weight", weight(len(tokens), hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# A text in the word-level vocabulary of with_tokenizer.
TEXT = " ".join(f"word{i % 97} token{i % 13}" for i in range(3000))


# A ChatML-like template in the tiny vocabulary: "token0 <role> <content> </s>" per turn, and
# "token0 assistant" as the generation prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}token0 {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}token0 assistant {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' 320-entry vocabulary, with a chat template and ``</s>`` as eos."""
    vocab = {f"word{i}": i for i in range(97)} | {f"token{i}": 97 + i for i in range(13)} | {"[UNK]": 110}
    vocab |= {"user": 111, "assistant": 112, "system": 113, "</s>": 114}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>", chat_template=CHAT_TEMPLATE)


def tiny_byte_level_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer (Qwen 2's class) within the tiny models' 320-entry vocabulary that reads the tiny models' texts, with their chat template and ``</s>`` as eos."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in ("word", "token"):  # the texts' two stems, one token each
        for i in range(1, len(word)):
            merges.append((word[:i], word[i]))
            vocab[word[: i + 1]] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="</s>", chat_template=CHAT_TEMPLATE)


def with_tokenizer(folder):
    """Give a tiny checkpoint :func:`tiny_tokenizer`, or a qwen2 one :func:`tiny_byte_level_tokenizer`.

    transformers builds Qwen 2's own tokenizer class for any qwen2 folder, whatever its files say,
    and that class is byte-level BPE only.
    """
    qwen2 = json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "qwen2"
    (tiny_byte_level_tokenizer() if qwen2 else tiny_tokenizer()).save_pretrained(folder)
    return folder


def nf4_twin(root: Path) -> tuple[Path, Path]:
    """:func:`tiny_checkpoint` with :func:`tiny_tokenizer` under ``root``, and its nf4 quantization at ``root / "nf4"`` (which copies the tokenizer)."""
    from compressor.formats import config_for
    from compressor.quantize import QuantizeJob, quantize_checkpoint

    src = with_tokenizer(tiny_checkpoint(root))
    quantize_checkpoint(QuantizeJob(src, root / "nf4", config_for("nf4"), progress=False))
    return src, root / "nf4"


# A fixed answer format a tiny model learns in a few dozen steps, held-out prompts included.
ANSWER_FORMAT = [{"prompt": f"word{i} word{i + 1}", "completion": "token3 token5 token7"} for i in range(40)]


def random_adapter(base_dir: Path, out_dir: Path, rank: int = 4, targets: tuple[str, ...] | None = None, seed: int = 0) -> Path:
    """A rank-``rank`` adapter with random B for ``base_dir`` (alpha = 2 x rank)."""
    from compressor.lora import DEFAULT_TARGETS, LoraConfig
    from compressor.lora.adapters import random_adapter as make

    return make(base_dir, out_dir, LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets or DEFAULT_TARGETS), seed)


def until(condition, timeout: float = 5.0) -> bool:
    """Wait for ``condition()`` to hold, up to ``timeout`` seconds; whether it did."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@contextmanager
def command_line(args: list[str], module: str = "serve", timeout: float = 90):
    """Run ``python -m MODULE ARGS`` (a server) on a free port; yields its base URL once it answers, then checks it stops gracefully on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    cmd = [sys.executable, "-m", module, *args, "--port", url.rpartition(":")[2]]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return proc.poll() is not None  # exited: stop waiting

    if not (until(up, timeout=timeout) and proc.poll() is None):
        proc.kill()  # a server still starting would otherwise keep communicate() waiting for ever
        raise AssertionError(proc.communicate(timeout=60)[1][-3000:])
    try:
        yield url
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    if module == "serve":
        # uvicorn shuts down gracefully (the lifespan stops the engine), then re-raises the signal it caught.
        assert "Application shutdown complete" in err and proc.returncode == -signal.SIGTERM, err[-3000:]
    else:
        assert proc.returncode == 0, err[-3000:]
