import pytest

from compressor.formats import METHODS, config_for, method_of


@pytest.mark.parametrize("method", METHODS)
def test_method_names_round_trip_through_configs(method):
    assert method_of(config_for(method)) == method


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'int5'"):
        config_for("int5")
