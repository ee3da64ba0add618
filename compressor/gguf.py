"""Turn a GGUF file into an ordinary float safetensors checkpoint with its tokenizer.

transformers reads GGUF (dequantizing every tensor) but refuses to ``save_pretrained`` such a model,
so we write the dequantized state dict ourselves, and the config, generation config and tokenizer
files as transformers writes them for other readers (llama.cpp's ``convert_hf_to_gguf.py``, vLLM).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
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
    """Write ``job.out_dir`` (config, tokenizer, model.safetensors); return a one-line summary.

    Raises:
        CompressorError: naming the file, before anything is written, for a missing, foreign, damaged or
            truncated file, an architecture transformers does not read from GGUF, or an existing
            ``out_dir`` without ``overwrite``.
    """
    path = job.gguf_file
    if job.out_dir.exists() and not job.overwrite:  # checked first: reading the model can take minutes
        raise CompressorError(job.out_dir, "already exists (pass --overwrite to replace it)")
    architecture = _architecture(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=job.dtype)
    except Exception as e:
        if "is not supported" in str(e):
            raise CompressorError(path, f"its architecture {architecture!r} is not one that transformers reads from GGUF") from None
        raise CompressorError(path, f"transformers cannot read this GGUF file ({_first_line(e)})") from None

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
        # The token ids come from the GGUF's tokenizer.ggml.*_token_id, which transformers maps onto the config.
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _for_older_readers(tmp)
    return f"{type(model).__name__}, {params:,} parameters in {str(job.dtype).removeprefix('torch.')}"


def _architecture(path: Path) -> str:
    """The GGUF file's ``general.architecture``, after checking that the file is a whole GGUF file."""
    if not path.is_file():
        raise CompressorError(path, "no such file")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise CompressorError(path, "not a GGUF file (bad magic)")
    try:
        # Parses the header and every tensor's extent; a file cut short fails here, not half way through the import.
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise CompressorError(path, f"truncated or damaged GGUF file ({_first_line(e)})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CompressorError(path, "GGUF file without general.architecture")
    return field.contents()


def _for_older_readers(folder: Path) -> None:
    # transformers >= 4.56 writes the dtype as "dtype" and names its own tokenizer class
    # TokenizersBackend; readers on older transformers (vLLM's pins among them) look for
    # "torch_dtype" and cannot import TokenizersBackend. Both versions read what we add:
    # PreTrainedTokenizerFast is what transformers 5 calls TokenizersBackend.
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("torch_dtype", config.get("dtype"))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        settings = json.loads(tokenizer_config.read_text())
        if settings.get("tokenizer_class") == "TokenizersBackend":
            settings["tokenizer_class"] = "PreTrainedTokenizerFast"
            tokenizer_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__
