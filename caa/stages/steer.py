"""``caa.steer``: steer a model in memory while a context is open, checked as the stages check."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from caa.core.hooks import deltas, steer_start, steering
from caa.errors import CaaError, OptionError
from caa.models.loading import LoadedModel, decoder_blocks
from caa.stages.checks import check_model
from caa.stages.vectors import VectorSet


@contextmanager
def steer(
    model: Any,
    vector: Any,
    layer: int,
    multiplier: float | Sequence[float] = 1.0,
    *,
    behavior: str | None = None,
    positions: str = "answer",
    prompt_length: Tensor | Sequence[int] | int | None = None,
    start: Tensor | int | None = None,
    scale: str = "raw",
) -> Iterator[None]:
    """Steer ``model`` while the context is open: add ``multiplier * vector`` to block ``layer``'s output.

    ``model`` is a :class:`caa.LoadedModel` or a transformers model; ``vector`` is a [d_model] array or
    tensor, or a :class:`caa.VectorSet` (then ``behavior`` picks its vector, and may be left out when
    the file holds one behavior; ``scale="residual"`` makes the multiplier one of the layer's mean
    residual norm; a VectorSet of another model is refused, as :func:`generate` refuses it).
    ``multiplier`` is one number, or one per batch row.

    Which positions: give ``prompt_length`` (the prompt's token count, per row or for all) and
    ``positions`` = ``answer`` (the paper's: every position after the prompt), ``prompt-end`` (the
    prompt's last token too) or ``all``; or give ``start``, the first steered position (an int or a
    [batch] tensor); with neither, every position is steered. Positions are the model's own
    ``position_ids``, so two ``generate`` calls in one context are steered alike. Example::

        inputs = loaded.tokenizer(["Tell me about your day."], return_tensors="pt")
        with caa.steer(loaded, caa.VectorSet.read("vectors.parquet"), layer=12, multiplier=1.5,
                       prompt_length=inputs["attention_mask"].sum(-1)):
            out = loaded.model.generate(**inputs)
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        blocks = decoder_blocks(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
        raise OptionError("layer", layer, f"must be a layer from 0 to {len(blocks) - 1}")
    if scale != "raw" and not isinstance(vector, VectorSet):
        raise CaaError(f"scale='{scale}' needs a VectorSet: it holds each layer's mean residual norm")
    if isinstance(vector, VectorSet):
        if isinstance(model, LoadedModel):
            check_model(vector, model)
        names = vector.behaviors()
        if behavior is None and len(names) != 1:
            raise CaaError(f"{vector.path} holds several behaviors ({', '.join(names)}): pass behavior=")
        vector = vector.vector(behavior or names[0], layer, scale)
    if isinstance(vector, Tensor):
        v = vector.detach().float().flatten()  # [d_model]
    else:  # a copy: numpy arrays read from Parquet are read-only
        v = torch.tensor(np.array(vector, dtype=np.float32)).flatten()
    config = getattr(getattr(model, "model", model), "config", None)
    width = getattr(config.get_text_config(), "hidden_size", None) if config is not None else None
    if width is not None and v.numel() != width:
        raise OptionError("vector", f"[{v.numel()} values]", f"must have the model's width, {width} values")
    if not bool(torch.isfinite(v).all()):
        raise OptionError("vector", f"[{v.numel()} values]", "holds values that are not finite")
    coefficients = [multiplier] if isinstance(multiplier, (int, float)) else list(multiplier)
    for m in coefficients:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not np.isfinite(m):
            raise OptionError("multiplier", multiplier, f"{m!r} is not a finite number")
    delta = deltas(v, coefficients)  # [1 or batch, d_model]
    if isinstance(multiplier, (int, float)):
        delta = delta[0]  # [d_model]: the same for every row
    if prompt_length is not None:
        if start is not None:
            raise CaaError("give prompt_length= (with positions=) or start=, not both")
        first = steer_start(positions, torch.as_tensor(prompt_length))
    else:
        first = None if start is None else torch.as_tensor(start, dtype=torch.long).reshape(-1)
    with steering(blocks, {layer: delta}, first):
        yield
