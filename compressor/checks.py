"""What a command checks before it starts work: the folders it reads, the windows it cuts, the output it writes.

Every command that loads a base checks it here, the same way: ``config.json`` readable, weights
present and safetensors (:func:`~compressor.checkpoint.reader.find_checkpoint`), a tokenizer where
one is read. Each check raises :class:`~compressor.errors.CompressorError` naming the file at
fault, before anything is written, so a bad input ends in one line and leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint.reader import Checkpoint, find_checkpoint
from .errors import CompressorError

# Files a transformers tokenizer is built from: one of them must be there.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def model_folder(model_dir: str | Path, tokenizer: bool = True, allow_pickle: bool = True) -> Checkpoint:
    """The checkpoint at ``model_dir``, refused unless its config, its weights and (with ``tokenizer``) a tokenizer are there."""
    from .checkpoint.model_info import load_config

    ckpt = find_checkpoint(model_dir, allow_pickle)
    load_config(ckpt.config_path)
    if tokenizer:
        _has_tokenizer(ckpt.root)
    return ckpt


def float_folder(model_dir: str | Path, command: str) -> None:
    """Refuse a folder whose weights are already quantized, which ``command`` cannot start from."""
    from .loading import quant_method

    method = quant_method(model_dir)
    if method != "float":
        raise CompressorError(Path(model_dir), f"is already quantized ({method}); {command} needs the float checkpoint")


def load_tokenizer(model_dir: str | Path):
    """The transformers tokenizer of ``model_dir``, or one line saying why there is none."""
    from transformers import AutoTokenizer

    root = Path(model_dir)
    _has_tokenizer(root)
    try:
        return AutoTokenizer.from_pretrained(root)
    except Exception as e:  # transformers, tokenizers and sentencepiece each raise their own types for a broken tokenizer
        raise CompressorError(root, f"cannot load the tokenizer ({str(e).strip().splitlines()[0]})") from None


def window_fits(model_dir: str | Path, seq_len: int, flag: str) -> None:
    """Refuse windows of ``seq_len`` tokens (set by ``flag``) longer than the context of the model at ``model_dir``."""
    from .checkpoint.model_info import load_config

    path = Path(model_dir) / "config.json"
    limit = getattr(load_config(path).get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise CompressorError(path, f"{flag} {seq_len} is longer than the model's context ({limit} positions, max_position_embeddings)")


def output_free(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an existing ``out_dir`` unless ``overwrite``: checked first, so that no work is wasted on it."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CompressorError(out, "already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise CompressorError(out, "is a file, not a folder")


def _has_tokenizer(root: Path) -> None:
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise CompressorError(root, f"no tokenizer (none of {', '.join(TOKENIZER_FILES)})")


def same_vocabulary(reference_dir: str | Path, model_dir: str | Path) -> None:
    """Refuse a reference model whose vocabulary differs from the model's: their logits cannot be compared."""
    from .checkpoint.model_info import load_config

    path = Path(reference_dir) / "config.json"
    theirs, ours = load_config(path).get_text_config().vocab_size, load_config(Path(model_dir) / "config.json").get_text_config().vocab_size
    if theirs != ours:
        raise CompressorError(path, f"vocabulary of {theirs} tokens, the model's has {ours}: a reference must share the model's tokenizer")
