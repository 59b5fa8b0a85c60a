"""`caa export` and `caa import`: steering vectors out of and into ``vectors.parquet``.

Layer l is always the output of decoder block l (0-based), caa's convention. The formats:

- ``gguf``: a llama.cpp control vector (``general.architecture = controlvector``), one F32 1-D tensor
  ``direction.N`` of length d_model per layer. llama.cpp adds ``direction.N`` to the output of decoder
  block N at every position, so ``direction.N`` is our layer N under ``--steer-positions all``, with no
  shift; its loader rejects ``direction.0`` (``common_control_vector_load_one`` in common/common.cpp),
  so layer 0 cannot be exported there.
- ``safetensors``: one 1-D tensor per layer named ``layer.N``; the metadata holds the model
  fingerprint (JSON) and the layer convention.
- ``npy``: one [d_model] array (one layer); ``npz``: arrays named ``layer_N``; the provenance rides in
  the .npy header's comment and the .npz zip comment (:mod:`caa.store.arrays`), unseen by numpy.
- ``lm-eval`` (export only: the file is a pickle, which caa never loads): what lm-evaluation-harness's
  ``steered`` model loads (``lm_eval/models/hf_steered.py``, lm-eval 0.4.13), a ``torch.save``'d dict
  keyed by hookpoint, the name of decoder block N below ``model.base_model`` (``layers.N`` for Llama,
  :func:`caa.models.loading.block_hookpoint`), each entry ``steering_vector`` (F32 [d_model]: the
  vector, or its direction at the residual norm), ``steering_coefficient`` (the multiplier), ``action``
  ``add``, ``bias`` None, ``head_index`` None, and ``caa`` (the provenance; lm-eval ignores it). Its
  forward hook on block N adds ``steering_coefficient * steering_vector`` to the block's output at
  every position, prompt included: our layer N under ``--steer-positions all``. The provenance is also
  the zip archive's comment, where a rerun finds the marker without unpickling anything.

Every export records its model (``caa.model``); an import of a file that records one is refused for
another model (:func:`check_origin`), and the strengths of both are checked against the model's dtype.
- ``sae`` (import only): a SAELens directory, ``cfg.json`` (``hook_name``, ``d_in``) beside
  ``sae_weights.safetensors`` (``W_dec`` [d_sae, d_in]); feature K's vector is ``W_dec[K]``. The
  output of block L (``blocks.L.hook_resid_post``) is our layer L; its input
  (``blocks.L.hook_resid_pre``) is the output of block L - 1, our layer L - 1.

The readers of other tools' files live in :mod:`caa.stages.foreign`; the round trip (what export writes,
import reads back unchanged) is tested across the two.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from caa.errors import CaaError, InputError, MismatchError
from caa.models.loading import block_hookpoint
from caa.stages.checks import strength_problem
from caa.stages.foreign import EXPORT_FORMATS, GGUF_ARCHITECTURE, Foreign
from caa.stages.options import check_behavior
from caa.stages.vectors import VectorSet, _adjacent_cosines
from caa.store.arrays import write_npy, write_npz
from caa.store.artifacts import make_meta
from caa.store.files import atomic_path
from caa.store.schemas import EXPORT_MARKER, VECTORS
from caa.store.text import check_name

LAYER_CONVENTION = (
    "layer N is the output of decoder block N (0-based): the residual stream after block N, "
    "hidden_states[N + 1] in transformers"
)
LM_EVAL = "lm-eval"
FORMATS = (*EXPORT_FORMATS, LM_EVAL)  # what export writes: lm-eval's file is never read back
_SUFFIXES = {"pt": LM_EVAL, "pth": LM_EVAL}  # the only suffixes lm-eval's steered model accepts
LM_EVAL_POSITIONS = (
    "lm-eval's steered model adds steering_coefficient * steering_vector to the output of the hooked "
    "decoder block at every position, prompt included: caa's steer positions 'all'"
)


# --- export -----------------------------------------------------------------------------------------


def export_format(fmt: str | None, out: Path) -> str:
    """``fmt``, or the format the output's suffix names (``.pt``, ``.pth``: lm-eval), with an error
    naming the choices."""
    choices = ", ".join(FORMATS)
    suffix = out.suffix.lower().removeprefix(".")
    if fmt is None:
        fmt = _SUFFIXES.get(suffix, suffix)
        if fmt not in FORMATS:
            raise CaaError(
                f"--out '{out}': give --format ({choices}) or an output ending in one of them (.pt: lm-eval)"
            )
    if fmt not in FORMATS:
        raise CaaError(f"--format '{fmt}': use one of {choices}")
    if fmt == LM_EVAL and suffix not in _SUFFIXES:
        raise CaaError(f"--out '{out}': lm-eval's steered model loads only a file ending in .pt or .pth")
    return fmt


@dataclass(frozen=True)
class Export:
    """What ``export_vectors`` wrote: one behavior's vectors at ``layers``, times ``multiplier``."""

    path: Path
    format: str
    behavior: str
    layers: list[int]
    multiplier: float
    hookpoints: list[str] | None = None  # lm-eval: the module each layer's entry hooks


def export_vectors(
    vectors: VectorSet,
    out: Path,
    fmt: str,
    *,
    behavior: str | None = None,
    layers: Sequence[int] | None = None,
    multiplier: float = 1.0,
    scale: str = "raw",
) -> Export:
    """Write one behavior's vectors (default: the file's only one) at ``layers`` (default: all it
    has), times ``multiplier`` (of the vector, or with ``scale="residual"`` of its direction at the
    layer's mean residual norm), as ``fmt`` (see the module's notes), atomically."""
    fmt = export_format(fmt, out)
    picked = vectors.pick(behavior)
    if not (math.isfinite(multiplier) and multiplier != 0):
        raise CaaError(f"--multiplier {multiplier}: must be a finite number other than 0")
    if fmt == "gguf" and 0 in (layers or vectors.layers(picked)):
        raise CaaError(
            f"{vectors.path}: layer 0 cannot be exported to a llama.cpp control vector: llama.cpp rejects "
            "direction.0 (its loader starts at block 1); choose layers from 1 with --layers"
        )
    chosen = vectors.require(picked, layers)
    if fmt == "npy" and len(chosen) != 1:
        raise CaaError(
            f"--format npy holds one layer, and {len(chosen)} are chosen "
            f"({', '.join(map(str, chosen))}): pick one with --layers, or use npz"
        )
    model = vectors.meta.get("model") or {}
    hookpoints = [_hookpoint(vectors, model, layer) for layer in chosen] if fmt == LM_EVAL else None
    dtype = model.get("dtype")  # the activations it will be added to
    scaled = {}
    for layer in chosen:
        with np.errstate(over="ignore"):
            value = (vectors.vector(picked, layer, scale).astype(np.float64) * multiplier).astype(np.float32)
        if not np.isfinite(value).all():
            raise CaaError(
                f"--multiplier {multiplier:g}: times the vector of '{picked}' at layer {layer}, "
                "it overflows float32"
            )
        problem = strength_problem(float(np.abs(value).max()), dtype) if dtype else None
        if problem:
            raise CaaError(
                f"--multiplier {multiplier:g}: times the vector of '{picked}' at layer {layer}, its "
                f"largest entry {problem} (the model of {vectors.path})"
            )
        scaled[layer] = value  # [d_model]
    provenance = {
        EXPORT_MARKER.decode(): "caa steering vectors",  # first: a rerun knows its own file by it
        "caa.behavior": picked,
        "caa.multiplier": repr(float(multiplier)),
        "caa.scale": scale,
        "caa.layer_convention": LAYER_CONVENTION,
        "caa.model": json.dumps(vectors.meta.get("model")),
        "caa.source": str(vectors.path),
    }
    if hookpoints is not None:  # lm-eval multiplies the two itself: the vector goes in unmultiplied
        provenance["caa.steer_positions"] = LM_EVAL_POSITIONS
        entries = {
            name: _lm_eval_entry(vectors.vector(picked, layer, scale), multiplier, provenance)
            for name, layer in zip(hookpoints, chosen, strict=True)
        }
        with atomic_path(Path(out)) as tmp:
            _write_lm_eval(tmp, entries, provenance)
        return Export(Path(out), fmt, picked, chosen, float(multiplier), hookpoints)
    writer = {"gguf": _write_gguf, "safetensors": _write_safetensors, "npy": _write_npy, "npz": _write_npz}
    with atomic_path(Path(out)) as tmp:
        writer[fmt](tmp, scaled, provenance, model)
    return Export(Path(out), fmt, picked, chosen, float(multiplier))


def _hookpoint(vectors: VectorSet, model: Mapping[str, Any], layer: int) -> str:
    """The lm-eval hookpoint of ``layer`` in the model the vectors record."""
    architecture = model.get("architecture")
    if not architecture:
        raise InputError(
            vectors.path,
            "records no model architecture, which lm-eval's hookpoint names depend on",
            field="model.architecture",
        )
    return block_hookpoint(str(architecture), layer)


def _lm_eval_entry(vector: np.ndarray, multiplier: float, provenance: Mapping[str, str]) -> dict[str, Any]:
    """One hookpoint's entry of lm-eval's steering file (see the module's notes)."""
    import torch

    return {
        "steering_vector": torch.from_numpy(np.array(vector, dtype=np.float32)),  # [d_model]
        "steering_coefficient": float(multiplier),
        "action": "add",
        "bias": None,  # lm-eval refuses a bias with "add"
        "head_index": None,
        "caa": dict(provenance),
    }


def _write_lm_eval(path: Path, entries: Mapping[str, Any], provenance: Mapping[str, str]) -> None:
    """``torch.save`` of ``entries``, a zip archive; ``provenance`` (the marker first) as its comment,
    which torch.load ignores."""
    import io
    import zipfile

    import torch

    buffer = io.BytesIO()
    torch.save(dict(entries), buffer)
    with zipfile.ZipFile(buffer, "a") as archive:  # rewrites the central directory only
        archive.comment = json.dumps(dict(provenance), ensure_ascii=True).encode()[:65535]
    path.write_bytes(buffer.getvalue())


def _write_gguf(
    path: Path, vectors: Mapping[int, np.ndarray], provenance: Mapping[str, str], model: Any
) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), GGUF_ARCHITECTURE)
    writer.add_string(f"{GGUF_ARCHITECTURE}.model_hint", str(model.get("architecture") or "unknown"))
    writer.add_uint32(f"{GGUF_ARCHITECTURE}.layer_count", len(vectors))
    for key, value in provenance.items():
        writer.add_string(key, value)
    for layer, vector in vectors.items():
        writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vector, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_safetensors(
    path: Path, vectors: Mapping[int, np.ndarray], provenance: Mapping[str, str], _: Any
) -> None:
    from safetensors.numpy import save_file

    save_file({f"layer.{layer}": v for layer, v in vectors.items()}, str(path), metadata=dict(provenance))


def _write_npy(path: Path, vectors: Mapping[int, np.ndarray], provenance: Mapping[str, str], _: Any) -> None:
    write_npy(path, next(iter(vectors.values())), provenance)  # the provenance: a comment in the header


def _write_npz(path: Path, vectors: Mapping[int, np.ndarray], provenance: Mapping[str, str], _: Any) -> None:
    write_npz(path, {f"layer_{layer}": v for layer, v in vectors.items()}, provenance)  # the zip's comment


# --- import: into vectors.parquet -------------------------------------------------------------------


def default_behavior(foreign: Foreign) -> str:
    """The behavior name of imported vectors: the one a caa export recorded, else ``feature_K`` for
    an SAE feature, else the file's stem."""
    if foreign.behavior:
        return foreign.behavior
    if foreign.source.get("feature") is not None:
        return f"feature_{foreign.source['feature']}"
    return Path(foreign.source["file"]).stem


def check_layers(foreign: Foreign, count: int | None, model: str) -> None:
    """Refuse layers that ``model`` (``count`` blocks; None: not known yet) does not have."""
    for layer in foreign.vectors:
        if count is not None and not 0 <= layer < count:
            raise MismatchError(
                f"{foreign.source['file']}: field '{foreign.names[layer]}': layer {layer} is out of range; "
                f"the model '{model}' has {count} blocks (layers 0-{count - 1})"
            )


_RECORDED = ("hidden_size", "num_layers")  # compared when recorded, then the weights (or the name)
_SAME_ARCHITECTURE = {"mistral": "llama", "mixtral": "llama"}  # llama.cpp converts these as llama


def check_origin(foreign: Foreign, model: Mapping[str, Any]) -> None:
    """Refuse vectors whose file records another model than ``model`` (a fingerprint): a caa export's
    ``caa.model`` (hidden size, layer count, then the weights hash, or the name when it records no
    hash), a control vector's ``controlvector.model_hint`` (the architecture). A file that records
    no model is not checked here (only its widths and layers are, against ``model``)."""
    file, name = foreign.source["file"], str(model.get("name", "the model"))
    made = foreign.model or {}
    keys = [*_RECORDED, "weights_hash" if made.get("weights_hash") is not None else "name"]
    for key in keys:
        if made.get(key) is not None and made[key] != model.get(key):
            raise MismatchError(
                f"{file}: field 'caa.model.{key}' is {made[key]!r}, but the model '{name}' has "
                f"{model.get(key)!r}: these vectors were made with another model"
            )

    def family(arch: Any) -> str:
        plain = "".join(c for c in str(arch).lower() if c.isalnum())
        return _SAME_ARCHITECTURE.get(plain, plain)

    hint, arch = foreign.model_hint, model.get("architecture")
    if hint and hint != "unknown" and arch and family(hint) != family(arch):
        raise MismatchError(
            f"{file}: field '{GGUF_ARCHITECTURE}.model_hint' is {hint!r}, but the model '{name}' is a "
            f"{arch!r} model: this control vector was made for another architecture"
        )


def import_vectors(
    foreign: Foreign,
    model: Mapping[str, Any],
    behavior: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> VectorSet:
    """``foreign`` as a :class:`VectorSet` for ``model`` (a fingerprint), checked against its
    hidden size and layer count. Diagnostics that need activations (pair counts, residual norm,
    consistency, test accuracy and AUC) are null; there are no training pairs, and the metadata's
    ``source`` says where the vectors came from (file, sha256, format, SAE feature and hook)."""
    check_origin(foreign, model)
    name = str(model.get("name", "the model"))
    width = int(model["hidden_size"])
    for layer, vector in foreign.vectors.items():
        if vector.shape[0] != width:
            raise MismatchError(
                f"{foreign.source['file']}: field '{foreign.names[layer]}': width {vector.shape[0]}, but "
                f"the model '{name}' has hidden_size {width}"
            )
    check_layers(foreign, int(model["num_layers"]), name)
    for layer, vector in foreign.vectors.items():
        problem = strength_problem(float(np.abs(vector.astype(np.float64)).max()), model.get("dtype"))
        if problem:
            raise InputError(
                foreign.source["file"],
                f"its largest entry {problem} in the model '{name}'",
                field=foreign.names[layer],
            )
    if behavior is not None:
        behavior = check_behavior("behavior", behavior)
    else:
        behavior = check_name(default_behavior(foreign), foreign.source["file"], field="behavior")
    layers = sorted(foreign.vectors)
    values = np.stack([foreign.vectors[layer] for layer in layers]).astype(np.float32)  # [layers, d_model]
    frame = pd.DataFrame(
        {
            "behavior": behavior,
            "layer": layers,
            "method": f"import:{foreign.source['format']}",
            "n_train": None,
            "n_test": None,
            "vector_norm": np.linalg.norm(values.astype(np.float64), axis=1),
            "mean_residual_norm": None,
            "pair_consistency": None,
            "test_accuracy": None,
            "test_auc": None,
            "vector": list(values),
        }
    )
    frame["cos_prev_layer"], frame["cos_next_layer"] = _adjacent_cosines(frame)
    for column in VECTORS.fields:  # every other diagnostic (e.g. norm_ratio) needs activations
        if column.name not in frame and column.nullable:
            frame[column.name] = None
    meta = make_meta(
        VECTORS,
        options or {},
        inputs=foreign.inputs,
        command="caa import",
        model=dict(model),
        prompt=None,
        layers=layers,
        behaviors=[behavior],
        train_pair_ids=[],  # no training pairs: the sweep has no held-out check to make
        source=foreign.source,
    )
    return VectorSet(frame.drop(columns="vector"), values, meta)
