"""Compress Hugging Face checkpoints, adapt them with LoRA and export them."""

__version__ = "0.1.0"


def load(model_dir, exact: bool = False):
    """Load a compressor output folder (any method) or a float checkpoint as a transformers model."""
    from .loading import load as _load

    return _load(model_dir, exact=exact)
