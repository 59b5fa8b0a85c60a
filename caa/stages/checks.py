"""Do these artifacts belong together? The rules every stage applies before it runs a model.

Vectors and the model they steer (fingerprint, width, layers), the prompt format they were read with,
the held-out pairs a sweep scores, and the multipliers a model's activations can hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from caa.core.prompts import PromptFormat
from caa.errors import CaaError, MismatchError
from caa.models.loading import LoadedModel
from caa.stages.vectors import VectorSet

MODEL_FIELDS = ("hidden_size", "weights_hash")  # a vector of another model is refused on these


def check_model(vectors: VectorSet, loaded: LoadedModel) -> None:
    """Refuse vectors made with another model or hidden size, naming the file and the field; and
    vectors whose width or layers do not fit the loaded model."""
    check_fits(
        vectors.path,
        vectors.meta.get("model"),
        int(vectors.values.shape[1]),
        vectors.frame.layer.astype(int),
        f"the loaded model '{loaded.fingerprint.name}'",
        loaded.fingerprint.to_dict(),
        hidden=loaded.hidden_size,
        num_layers=loaded.num_layers,
    )


def check_fits(
    path: object,
    recorded: Mapping[str, Any] | None,
    width: int,
    layers: Iterable[int],
    model: str,
    known: Mapping[str, Any],
    *,
    hidden: int | None = None,
    num_layers: int | None = None,
    strict: bool = True,
) -> None:
    """The one check that vectors belong to a model, wherever the model is known (loaded, resolved
    before a server starts, or inside the engine). ``path`` names the vectors' file in the messages,
    ``recorded`` is the model fingerprint it carries (its metadata's ``model``), ``model`` says which
    model it is checked against ("the loaded model 'x'"), and ``known`` holds the fingerprint fields
    known of that model (of :data:`MODEL_FIELDS`; one not known is not compared). With ``strict`` a
    field the file did not record is refused as well. ``width`` and ``layers`` are the vectors';
    ``hidden`` and ``num_layers`` (None: not known) are the model's."""
    recorded = recorded or {}
    for name in MODEL_FIELDS:
        if name not in known or (not strict and recorded.get(name) is None):
            continue
        if recorded.get(name) != known[name]:
            raise MismatchError(
                f"{path}: field 'model.{name}' is {recorded.get(name)!r} but {model} has "
                f"{known[name]!r}: these vectors were made with another model"
            )
    if hidden is not None and width != hidden:
        raise MismatchError(
            f"{path}: field 'vector' has width {width} but the model's hidden_size is {hidden}"
        )
    if num_layers is None:
        return
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise MismatchError(
            f"{path}: field 'layer': layer {bad[0]} is out of range; the model has "
            f"{num_layers} blocks (layers 0-{num_layers - 1})"
        )


def check_template(vectors: VectorSet, style: PromptFormat, option: str = "--chat-template") -> None:
    """Refuse to use vectors read under one prompt format with the other (chat template or plain)."""
    made = (vectors.meta.get("prompt") or {}).get("chat_template")
    if made is not None and bool(made) != style.chat:

        def name(chat: bool) -> str:
            return "the chat template" if chat else "plain text (no chat template)"

        raise MismatchError(
            f"{vectors.path}: field 'prompt.chat_template': its activations were read with "
            f"{name(bool(made))}, but this run uses {name(style.chat)}; set {option} to match"
        )


def check_held_out(
    vectors: VectorSet, pairs: pd.DataFrame, pairs_path: Path, notice: Callable[[str], None] | None = None
) -> None:
    """Refuse to score pairs that trained the vectors (another pairs file, or another split).
    Vectors that list no training pairs (imported ones) leave nothing to check: ``notice`` says so."""
    trained = set(vectors.meta.get("train_pair_ids") or [])
    if not trained and notice:
        notice(
            f"{vectors.path}: no training pairs recorded (field 'train_pair_ids', empty for imported "
            "vectors): the held-out check was skipped"
        )
    leaked = pairs.pair_id[pairs.pair_id.isin(trained)]
    if len(leaked):
        raise MismatchError(
            f"{pairs_path}: {len(leaked)} of its test pairs (e.g. '{leaked.iloc[0]}') trained the vectors "
            f"in {vectors.path} (field 'train_pair_ids'): score held-out pairs only"
        )


def activation_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``dtype`` (a torch dtype or a name such as ``bfloat16``) as a floating torch dtype; float32
    when it is unknown."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def strength_problem(peak: float, dtype: torch.dtype | str | None) -> str | None:
    """Why a steering delta whose largest entry is ``peak`` does not fit ``dtype`` activations (None if
    it does). The limit is the square root of the dtype's largest value: norms square the residual,
    and beyond it they overflow."""
    resolved = activation_dtype(dtype)
    top = float(torch.finfo(resolved).max) ** 0.5
    if math.isfinite(peak) and peak < top:
        return None
    return f"is {peak:.3g}, beyond what {resolved} activations hold (about {top:.3g})"


def check_strength(
    vectors: dict[int, torch.Tensor], multipliers: Sequence[float], loaded: LoadedModel
) -> None:
    """Refuse (before any work) a multiplier and vector whose product overflows the model's dtype."""
    dtype = next(loaded.model.parameters()).dtype
    biggest = max(abs(m) for m in multipliers)
    for layer, vector in vectors.items():
        peak = biggest * float(vector.double().abs().max())
        problem = strength_problem(peak, dtype)
        if problem:
            raise CaaError(
                f"--multipliers: x{biggest:g} times the layer-{layer} vector (largest entry "
                f"{float(vector.abs().max()):.3g}) {problem}: lower the multipliers"
            )
