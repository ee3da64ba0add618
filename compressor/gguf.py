"""Turn a GGUF file into an ordinary float safetensors checkpoint with its tokenizer.

transformers reads GGUF (dequantizing every tensor) but refuses to ``save_pretrained`` such a model,
so we write the dequantized state dict ourselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .checkpoint.atomic import atomic_folder
from .checkpoint.reader import SINGLE
from .checkpoint.writer import ShardWriter
from .errors import CompressorError

_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ImportJob:
    """One ``compressor import-gguf`` run."""

    gguf_file: Path
    out_dir: Path
    dtype: torch.dtype = torch.float32  # GGUF blocks dequantize to float32; narrower would round again
    overwrite: bool = False


def import_gguf(job: ImportJob) -> str:
    """Write ``job.out_dir`` (config, tokenizer, model.safetensors); return a one-line summary."""
    path = job.gguf_file
    if not path.is_file():
        raise CompressorError(path, "no such file")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise CompressorError(path, "not a GGUF file (bad magic)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=job.dtype)
    except Exception as e:
        raise CompressorError(path, f"transformers cannot read this GGUF file ({e})") from None

    with atomic_folder(job.out_dir, job.overwrite) as tmp:
        writer = ShardWriter(tmp / SINGLE)
        seen: set[int] = set()
        params = 0
        try:
            # A tied output head shares its embedding's storage; like save_pretrained, store it once.
            for name, tensor in model.state_dict().items():
                if tensor.data_ptr() in seen:
                    continue
                seen.add(tensor.data_ptr())
                params += tensor.numel()
                writer.add(name, tensor)
            writer.finish({"format": "pt"})
        except BaseException:
            writer.abort()
            raise
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # What save_pretrained records and other readers need to pick a model class (llama.cpp's
        # convert_hf_to_gguf.py, vLLM): transformers leaves it unset for a model read from GGUF.
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return f"{type(model).__name__}, {params:,} parameters in {str(job.dtype).removeprefix('torch.')}"
