"""caa.core.options: layers checked against what only the model knows."""

from __future__ import annotations

import pytest

from caa.core.options import model_layers
from caa.errors import OptionError


def test_model_layers_checks_the_range_against_the_model() -> None:
    assert model_layers(None, 4) == [0, 1, 2, 3]
    assert model_layers([3, 1, 1], 4) == [1, 3]
    with pytest.raises(OptionError, match="layer 4 is out of range; valid layers are 0-3") as caught:
        model_layers([2, 3, 4], 4)
    assert caught.value.option == "layers"


def test_model_layers_names_the_option_it_checks() -> None:
    with pytest.raises(OptionError, match=r"^layer=\[7\]: layer 7 is out of range") as caught:
        model_layers([7], 4, option="layer")
    assert caught.value.option == "layer" and caught.value.value == [7]
