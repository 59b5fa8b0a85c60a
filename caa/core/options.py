"""Option values checked against what only the model knows: its layers."""

from __future__ import annotations

from collections.abc import Sequence

from caa.errors import OptionError


def model_layers(layers: Sequence[int] | None, num_layers: int, option: str = "layers") -> list[int]:
    """``layers`` (None: every block) checked against a model of ``num_layers`` blocks, sorted."""
    if layers is None:
        return list(range(num_layers))
    for layer in sorted(set(layers)):
        if not 0 <= layer < num_layers:
            raise OptionError(
                option,
                list(layers),
                f"layer {layer} is out of range; valid layers are 0-{num_layers - 1} "
                f"(this model has {num_layers} blocks)",
            )
    return sorted(set(layers))
