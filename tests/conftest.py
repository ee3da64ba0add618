"""Shared test setup: CPU by default, GPU tests behind the ``gpu`` marker."""

import logging

import pytest
import torch

# bitsandbytes logs a warning about an optional GPU-kernel package on import; it is noise here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
