"""A tiny float base, its nf4 twin, that twin exported to ONNX, and a few adapters, built once per test module."""

import pytest

from compressor.export.exporter import OnnxExportJob, export_onnx
from tests.helpers import nf4_twin, random_adapter, tiny_model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """``{"float": dir, "nf4": dir, "adapters": root}`` with adapters a (rank 4, all projections), b (rank 8, attention only) per base."""
    root = tmp_path_factory.mktemp("serve")
    folders = dict(zip(("float", "nf4"), nf4_twin(root)))
    folders["adapters"] = root / "adapters"
    for kind in ("float", "nf4"):
        random_adapter(folders[kind], root / "adapters" / f"{kind}-a", rank=4, seed=1)
        random_adapter(folders[kind], root / "adapters" / f"{kind}-b", rank=8, targets=("q_proj", "v_proj", "o_proj"), seed=2)
    return folders


@pytest.fixture(scope="module")
def onnx_base(bases):
    """The nf4 base as ``compressor export onnx`` writes it (LoRA inputs on every projection): what ``--backend onnx`` serves."""
    out = bases["adapters"].parent / "nf4-onnx"
    export_onnx(OnnxExportJob(base_dir=bases["nf4"], out_dir=out))
    return out


@pytest.fixture(scope="module")
def foreign(bases):
    """An adapter under the adapter root, made for a base with other weights."""
    other = bases["adapters"].parent / "other-base"
    tiny_model(seed=1).save_pretrained(other)
    return random_adapter(other, bases["adapters"] / "foreign", seed=3)
