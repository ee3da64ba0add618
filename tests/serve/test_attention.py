import pytest
import torch

from serve.attention import check_supported
from tests.helpers import CONFIGS


def test_sliding_window_and_softcapping_models_are_refused():
    check_supported(CONFIGS["llama"]())
    with pytest.raises(ValueError, match="sliding-window"):
        check_supported(CONFIGS["mistral"]())
