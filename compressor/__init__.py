"""Compress Hugging Face checkpoints, adapt them with LoRA and export them."""

__version__ = "0.1.0"
