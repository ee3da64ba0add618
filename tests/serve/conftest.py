"""A tiny float base, its nf4 twin and a few adapters, built once per test module."""

import pytest

from compressor.formats import config_for
from compressor.quantize import QuantizeJob, quantize_checkpoint
from tests.helpers import random_adapter, tiny_checkpoint, with_tokenizer


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """``{"float": dir, "nf4": dir, "adapters": root}`` with adapters a (rank 4, all projections), b (rank 8, attention only) per base."""
    root = tmp_path_factory.mktemp("serve")
    folders = {"float": with_tokenizer(tiny_checkpoint(root))}
    quantize_checkpoint(QuantizeJob(folders["float"], root / "nf4", config_for("nf4"), progress=False))
    folders["nf4"] = with_tokenizer(root / "nf4")
    folders["adapters"] = root / "adapters"
    for kind in ("float", "nf4"):
        random_adapter(folders[kind], root / "adapters" / f"{kind}-a", rank=4, seed=1)
        random_adapter(folders[kind], root / "adapters" / f"{kind}-b", rank=8, targets=("q_proj", "v_proj", "o_proj"), seed=2)
    return folders
