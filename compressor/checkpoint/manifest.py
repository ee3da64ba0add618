"""The manifest a quantized folder carries: how it was made, from which float files, and what it holds.

``compressor quantize`` writes it; merging again the same way (``merge --to same``), LoftQ (which
needs the float source), adapter fingerprints and exports read it. A folder quantized by
transformers + bitsandbytes has none: readers that need one refuse such a folder by name.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import CompressorError
from ..formats import config_for
from .reader import INDEX

NAME = "manifest.json"
VERSION = 1
# Files of a source folder that are weights or rewritten by us; everything else (tokenizer,
# generation config, chat template, licence) is copied as it is.
_NOT_COPIED = {"config.json", NAME, INDEX, "pytorch_model.bin.index.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def write(folder: Path, method: str, options: dict, source: Path, files: dict[str, dict], summary: dict, tensors: dict,
          budget: dict | None = None) -> None:  # fmt: skip
    """Write ``folder``'s manifest: ``files`` maps each source shard's name to its sha256 and bytes."""
    manifest = {
        "manifest_version": VERSION,
        "compressor_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "options": options,
        "source": {"path": str(source.resolve()), "files": files},
        "summary": summary,
        "tensors": tensors,
    }
    if budget is not None:
        manifest["budget"] = budget
    (folder / NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def exists(folder: Path) -> bool:
    """Whether ``folder`` carries a manifest (it was written by ``compressor quantize``)."""
    return (Path(folder) / NAME).is_file()


def read(folder: Path, why: str) -> dict:
    """``folder``'s manifest; a missing or unreadable one is a :class:`CompressorError` naming it and saying ``why`` it was needed."""
    path = Path(folder) / NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompressorError(path, f"no manifest: {why} needs a folder written by 'compressor quantize'") from None
    except (OSError, ValueError) as e:
        raise CompressorError(path, f"unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("source"), dict):
        raise CompressorError(path, "not a compressor manifest (no 'source')")
    return manifest


def quantize_options(manifest: dict) -> tuple[object, tuple[str, ...], bool]:
    """The inverse of the manifest's method and options: ``(config, skip, quantize_head)`` to quantize the same way again."""
    opts = manifest["options"]
    cfg = config_for(
        manifest["method"], opts.get("blocksize"), double_quant=opts.get("double_quant", True),
        per_tensor=opts.get("granularity") == "PerTensor", absmax_rounding=opts.get("absmax_rounding", "lut"),
    )  # fmt: skip
    return cfg, tuple(opts.get("skip", ())), opts.get("quantize_head", False)


def float_source(folder: Path) -> Path:
    """The float checkpoint a quantized folder was made from, as its manifest records it."""
    manifest = read(folder, "finding the float checkpoint it came from")
    try:
        return Path(manifest["source"]["path"])
    except (KeyError, TypeError) as e:
        raise CompressorError(Path(folder) / NAME, f"no source path ({e}); pass the float checkpoint explicitly") from None


def source_hashes(folder: Path) -> list[str] | None:
    """The sha256 of each float shard ``folder`` was made from, by shard name; None where it has no manifest."""
    if not exists(folder):
        return None
    files = read(folder, "the base's fingerprint")["source"]["files"]
    return [files[name]["sha256"] for name in sorted(files)]


def copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    """Copy tokenizer, generation config and other non-weight files (not config.json, the index or the manifest)."""
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED and not path.name.endswith(_WEIGHT_SUFFIXES) and not path.name.startswith("."):
            shutil.copy2(path, dst_dir / path.name)
