"""Compress Hugging Face checkpoints, adapt them with LoRA and export them."""

__version__ = "0.1.0"


def load(model_dir, exact: bool = False, activations: str = "float32", native_generate: bool = True):
    """Load a compressor output folder (any method) or a float checkpoint as a transformers model (see :func:`compressor.loading.load`)."""
    from .loading import load as _load

    return _load(model_dir, exact=exact, activations=activations, native_generate=native_generate)
