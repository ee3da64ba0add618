"""A tiny float base, its nf4 twin, two adapters for it, and the nf4 base exported with both, built once per test module."""

import pytest

from compressor.export.exporter import OnnxExportJob, export_onnx
from tests.helpers import nf4_twin, random_adapter


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{"float", "nf4", "a", "b", "onnx"}``: folders; adapters a (rank 4, every projection) and b (rank 8, attention only)."""
    root = tmp_path_factory.mktemp("export")
    folders = dict(zip(("float", "nf4"), nf4_twin(root)))
    folders["a"] = random_adapter(folders["nf4"], root / "a", rank=4, seed=1)
    folders["b"] = random_adapter(folders["nf4"], root / "b", rank=8, targets=("q_proj", "v_proj", "o_proj"), seed=2)
    folders["onnx"] = root / "onnx"
    export_onnx(OnnxExportJob(folders["nf4"], folders["onnx"], adapters=(("a", folders["a"]), ("b", folders["b"]))))
    return folders
