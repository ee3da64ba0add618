import pytest

from serve.types import EngineConfig


@pytest.mark.parametrize("field,value", [("prefill", "float16"), ("head", "int4"), ("activations", "int4"), ("backend", "tf")])
def test_an_engine_config_refuses_an_unknown_choice_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        EngineConfig(tmp_path, **{field: value})
