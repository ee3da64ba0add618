"""Inference over the native kernels: the decoder step, per-row adapters, per-sequence caches, and a fast ``generate``."""
