import pytest

from compressor.errors import CompressorError
from serve.backend import open_backend
from serve.types import EngineConfig


def test_the_onnx_backend_refuses_a_folder_that_is_not_an_export_naming_it(bases):
    with pytest.raises(CompressorError, match="compressor export onnx") as refused:
        open_backend(EngineConfig(bases["nf4"], backend="onnx"))
    assert refused.value.path == str(bases["nf4"])


def test_the_torch_backend_refuses_an_onnx_export_and_names_the_backend_that_serves_it(onnx_base):
    with pytest.raises(CompressorError, match="--backend onnx") as refused:
        open_backend(EngineConfig(onnx_base))
    assert refused.value.path == str(onnx_base)


def test_an_unknown_backend_is_refused_by_the_config(bases):
    with pytest.raises(ValueError, match="backend must be one of torch, onnx"):
        EngineConfig(bases["nf4"], backend="tensorflow")
