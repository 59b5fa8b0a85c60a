"""Steering vectors in other tools' files, read and checked: what `caa import` takes in.

A llama.cpp control vector (.gguf) by llama.cpp's own loading rules, .safetensors, .npy or .npz
arrays (a caa export among them, whose behavior name is kept), or one feature of a SAELens sparse
autoencoder; the formats and their layer conventions are described in :mod:`caa.stages.interchange`. The
files are untrusted: every parser failure is an error naming the file, and pickles are never loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from caa.errors import CaaError, InputError
from caa.store.arrays import read_npy, read_npz
from caa.store.artifacts import require_file
from caa.store.files import file_sha256
from caa.store.text import first_line, load_json

EXPORT_FORMATS = ("gguf", "safetensors", "npy", "npz")  # what `caa export` writes and this reads back
IMPORT_FORMATS = (*EXPORT_FORMATS, "sae")
GGUF_ARCHITECTURE = "controlvector"
SAE_CONFIG, SAE_WEIGHTS = "cfg.json", "sae_weights.safetensors"
# Layer numbers are ASCII digits only: Python's \d and int() take any script's digits ("direction.٣")
_LAYER_NAME = re.compile(r"layer[._]([0-9]+)")  # safetensors layer.12, npz layer_12
_DIRECTION = re.compile(r"direction\.([0-9]+)")
_HOOK = re.compile(r"blocks\.([0-9]+)\.(hook_[a-z_]+)")
FORMAT_NAMES = {
    "gguf": "a GGUF file",
    "safetensors": "a safetensors file",
    "npy": "a NumPy .npy array",
    "npz": "a zip archive (.npz)",
}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the floating-point dtypes


@dataclass
class Foreign:
    """Vectors read from another tool's file: layer -> [d_model] float32, the name of the tensor or
    field each came from (for messages), and where they came from (the ``source`` metadata)."""

    vectors: dict[int, np.ndarray]
    names: dict[int, str]
    source: dict[str, Any]
    behavior: str | None = None  # the name the file suggests (a caa export's), if any
    inputs: dict[str, Path] = field(default_factory=dict)
    model: dict[str, Any] | None = None  # the model fingerprint the file records (a caa export's)
    model_hint: str | None = None  # a control vector's controlvector.model_hint (an architecture)


def read_foreign(path: Path, *, layer: int | None = None, feature: int | None = None) -> Foreign:
    """Read steering vectors from a llama.cpp/repeng control vector (.gguf), .safetensors, .npy or
    .npz arrays, or a SAELens directory (with ``feature``). ``layer`` names the layer of a lone
    array, or picks one layer of a file that names its layers."""
    path = Path(path)
    fmt = sniff(path)
    if fmt == "sae":
        if feature is None:
            raise CaaError(f"{path}: is a sparse-autoencoder directory: choose a feature with --feature K")
        found = _read_sae(path, feature)
        if layer is not None and layer not in found.vectors:
            (at,) = found.vectors
            raise CaaError(f"--layer {layer}: {path} is an SAE of layer {at} (field 'hook_name')")
        return found
    if feature is not None:
        raise CaaError(
            f"--feature {feature}: only a sparse-autoencoder directory has features; {path} is {fmt}"
        )
    reader = {"gguf": _read_gguf, "safetensors": _read_safetensors, "npy": _read_npy, "npz": _read_npz}
    named, arrays, extra = reader[fmt](path)  # named: layer -> tensor name; arrays: tensor name -> array
    if not named:
        if len(arrays) != 1:
            raise InputError(
                path,
                f"none of its {len(arrays)} arrays names a layer (expected layer.N or layer_N)",
                field=next(iter(arrays), None),
            )
        if layer is None:
            raise CaaError(f"{path}: holds one vector and does not say its layer: give --layer L")
        named = {layer: next(iter(arrays))}
    elif layer is not None:
        if layer not in named:
            have = ", ".join(map(str, sorted(named)))
            raise CaaError(f"--layer {layer}: {path} has no vector for layer {layer}; it has layers {have}")
        named = {layer: named[layer]}
    vectors = {at: _checked_vector(path, name, arrays[name]) for at, name in sorted(named.items())}
    widths = {v.shape[0] for v in vectors.values()}
    if len(widths) > 1:
        first, *_ = vectors
        other = next(at for at, v in vectors.items() if v.shape[0] != vectors[first].shape[0])
        raise InputError(
            path,
            f"width {vectors[other].shape[0]}, but {named[first]} has width {vectors[first].shape[0]}",
            field=named[other],
        )
    source = {"file": str(path), "sha256": file_sha256(path), "format": fmt, "feature": None}
    found = Foreign(vectors, dict(named), source, extra.get("behavior"), {"source": path})
    found.model, found.model_hint = extra.get("model"), extra.get("model_hint")
    return found


def sniff(path: Path) -> str:
    """The format of ``path``: ``sae`` for a directory, else by its first bytes (its magic), which
    must agree with the format its suffix names, if it names one."""
    if path.is_dir():
        return "sae"
    require_file(path)
    with open(path, "rb") as f:
        head = f.read(16)
    found = _magic(head, path.stat().st_size)
    suffix = path.suffix.lower().removeprefix(".")
    if suffix in ("pt", "pth"):  # lm-eval's steering file among them: torch.save, a pickle
        raise InputError(
            path,
            "a PyTorch file holds a pickle, which caa never loads (an lm-eval export is not read back): "
            "import the same vectors as .safetensors, .npz or .gguf",
        )
    if suffix in EXPORT_FORMATS and found != suffix:
        what = f"it is {FORMAT_NAMES[found]}" if found else f"it is not {FORMAT_NAMES[suffix]}"
        raise InputError(path, f"named .{suffix}, but {what} (by its first bytes, {head[:8]!r})")
    if found is None:
        raise InputError(
            path,
            "unknown vector file: expected a GGUF control vector, .safetensors, .npy, .npz, or a "
            "sparse-autoencoder directory",
        )
    return found


def _magic(head: bytes, size: int) -> str | None:
    """The format whose magic bytes ``head`` starts with: GGUF ``GGUF``, npy ``\\x93NUMPY``, npz a
    zip archive (``PK\\x03\\x04``, or ``PK\\x05\\x06`` when empty), safetensors an 8-byte header
    length that fits the file, then the JSON header's ``{``."""
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "npz"
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return None


Read = tuple[dict[int, str], dict[str, np.ndarray], dict[str, Any]]


def _read_gguf(path: Path) -> Read:
    """llama.cpp's rules (common_control_vector_load_one): every tensor named direction.N with
    N >= 1, F32, one dimension, all the same length; plus general.architecture = controlvector."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # an untrusted file in a third-party parser: any failure means unreadable
        raise InputError(
            path, f"not a readable GGUF file ({type(e).__name__}: {first_line(e)[:200]})"
        ) from None
    kv = {name: _field_value(f) for name, f in reader.fields.items()}
    arch = kv.get("general.architecture")
    if arch != GGUF_ARCHITECTURE:
        raise InputError(
            path,
            f"not a llama.cpp control vector: general.architecture is {arch!r}, expected "
            f"'{GGUF_ARCHITECTURE}' (a model GGUF goes to --model)",
            field="general.architecture",
        )
    if not reader.tensors:
        raise InputError(path, "a control vector with no direction tensors")
    named: dict[int, str] = {}
    arrays: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = str(tensor.name)
        match = _DIRECTION.fullmatch(name)
        if match is None:
            raise InputError(path, "not a direction tensor (llama.cpp expects direction.N)", field=name)
        layer = int(match.group(1))
        if layer == 0:
            raise InputError(
                path, "llama.cpp rejects direction.0 (its control vectors start at block 1)", field=name
            )
        if layer in named:
            raise InputError(path, f"a second tensor for layer {layer} (after {named[layer]})", field=name)
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise InputError(
                path, f"type {tensor.tensor_type.name}, but llama.cpp reads only F32 directions", field=name
            )
        shape = [int(n) for n in tensor.shape]
        if len(shape) != 1:  # llama.cpp counts [d_model, 1] as 1-D but [1, d_model] as 2-D: neither
            raise InputError(path, f"shape {shape}: a direction is one-dimensional", field=name)
        named[layer] = name
        arrays[name] = np.array(tensor.data, dtype=np.float32).reshape(-1)  # copied out of the memmap
    hint = kv.get(f"{GGUF_ARCHITECTURE}.model_hint")
    return named, arrays, {**_recorded(path, kv), "model_hint": hint if isinstance(hint, str) else None}


def _recorded(path: Path, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The behavior and the model (``caa.model``, a fingerprint as JSON) that a caa export recorded
    in a file's metadata; None for each it does not record."""
    meta = meta or {}
    behavior = meta.get("caa.behavior")
    raw = meta.get("caa.model")
    model = None
    if raw is not None:
        try:
            model = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            raise InputError(path, "not valid JSON (a model fingerprint)", field="caa.model") from None
        if model is not None and not isinstance(model, dict):
            raise InputError(path, "expected a JSON object (a model fingerprint)", field="caa.model")
    return {"behavior": behavior if isinstance(behavior, str) else None, "model": model}


def _field_value(f: Any) -> Any:
    try:
        return f.contents()
    except Exception:  # a field type this gguf version cannot decode: not one we read
        return None


def _layer_names(path: Path, names: Sequence[str]) -> dict[int, str]:
    """layer -> name, for the names that follow layer.N / layer_N (all of them, or none)."""
    named: dict[int, str] = {}
    for name in names:
        match = _LAYER_NAME.fullmatch(name)
        if match is None:
            continue
        layer = int(match.group(1))
        if layer in named:
            raise InputError(path, f"a second array for layer {layer} (after {named[layer]})", field=name)
        named[layer] = name
    stray = [n for n in names if n not in named.values()]
    if named and stray:
        raise InputError(
            path, "does not name a layer (expected layer.N or layer_N, as the others)", field=stray[0]
        )
    return named


def _read_safetensors(path: Path) -> Read:
    """Every tensor, each checked from the header (a float dtype, one dimension) before it is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            for name in names:
                _check_header(path, name, f.get_slice(name), "a steering vector")
            arrays = {name: f.get_tensor(name).float().numpy() for name in names}
            meta = f.metadata() or {}
    except InputError:
        raise
    except Exception as e:  # an untrusted file in a third-party parser
        raise InputError(path, f"not a readable safetensors file ({first_line(e)[:200]})") from None
    if not arrays:
        raise InputError(path, "holds no tensors")
    return _layer_names(path, list(arrays)), arrays, _recorded(path, meta)


def _check_header(path: Path, name: str, piece: Any, what: str, dims: int = 1) -> list[int]:
    """The shape of a safetensors tensor, from its header: ``dims`` dimensions of floating point."""
    dtype, shape = str(piece.get_dtype()), [int(n) for n in piece.get_shape()]
    if dtype not in _FLOAT_DTYPES:
        raise InputError(
            path, f"dtype {dtype}: expected floating-point values ({', '.join(_FLOAT_DTYPES)})", field=name
        )
    if len(shape) != dims:
        raise InputError(path, f"shape {shape}: {what} has {dims} dimension{'s' * (dims > 1)}", field=name)
    return shape


def _read_npy(path: Path) -> Read:
    array, note = read_npy(path)
    return {}, {"array": array}, _recorded(path, note)


def _read_npz(path: Path) -> Read:
    arrays, note = read_npz(path)
    if not arrays:
        raise InputError(path, "holds no arrays")
    return _layer_names(path, list(arrays)), arrays, _recorded(path, note)


def _checked_vector(path: Path, name: str, array: np.ndarray) -> np.ndarray:
    """``array`` as a finite, non-zero float32 vector [d_model], or an error naming ``name``."""
    if array.dtype.kind != "f":
        raise InputError(path, f"dtype {array.dtype}: expected floating-point values", field=name)
    if array.ndim != 1:
        raise InputError(path, f"shape {list(array.shape)}: a steering vector is one-dimensional", field=name)
    if array.shape[0] == 0:
        raise InputError(path, "an empty vector", field=name)
    with np.errstate(over="ignore"):
        vector = array.astype(np.float32)
    if not np.isfinite(vector).all():
        raise InputError(path, "has NaN or infinite values (in float32)", field=name)
    if not np.abs(vector).max() > 0:
        raise InputError(path, "is all zeros (steering with it changes nothing)", field=name)
    return vector


def _read_sae(directory: Path, feature: int) -> Foreign:
    """Feature ``feature`` of a SAELens SAE: the row ``W_dec[feature]``, at the layer its hook reads."""
    config_path = require_file(directory / SAE_CONFIG)
    weights = require_file(directory / SAE_WEIGHTS)
    config = load_json(config_path.read_bytes(), config_path, what="is not a valid JSON file")
    if not isinstance(config, dict):
        raise InputError(config_path, "expected a JSON object")
    metadata = config["metadata"] if isinstance(config.get("metadata"), dict) else {}
    hook = config.get("hook_name", metadata.get("hook_name", config.get("hook_point")))
    if not isinstance(hook, str):
        raise InputError(
            config_path, "missing, or not a string (e.g. blocks.12.hook_resid_post)", field="hook_name"
        )
    layer = sae_layer(hook, config_path)
    d_in = config.get("d_in")
    if not isinstance(d_in, int) or isinstance(d_in, bool) or d_in < 1:
        raise InputError(config_path, f"expected a positive integer, found {d_in!r}", field="d_in")
    d_sae = config.get("d_sae")  # optional; when given, it must be W_dec's row count
    if d_sae is not None and (not isinstance(d_sae, int) or isinstance(d_sae, bool) or d_sae < 1):
        raise InputError(config_path, f"expected a positive integer, found {d_sae!r}", field="d_sae")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            if "W_dec" not in f.keys():  # noqa: SIM118
                raise InputError(weights, "tensor missing", field="W_dec")
            rows = f.get_slice("W_dec")
            shape = _check_header(weights, "W_dec", rows, "a decoder [d_sae, d_in]", dims=2)
            if shape[1] != d_in:
                raise InputError(
                    weights,
                    f"shape {shape}, expected [d_sae, d_in] with d_in = {d_in} (cfg.json)",
                    field="W_dec",
                )
            if d_sae is not None and d_sae != shape[0]:
                raise InputError(
                    config_path, f"{d_sae}, but {weights} (field 'W_dec') has {shape[0]} rows", field="d_sae"
                )
            if not 0 <= feature < shape[0]:
                raise CaaError(
                    f"--feature {feature}: out of range; {weights} (field 'W_dec') has "
                    f"{shape[0]} features (0-{shape[0] - 1})"
                )
            row = rows[feature : feature + 1].float().numpy()[0]  # [d_in], only this row is read
    except CaaError:
        raise
    except Exception as e:  # an untrusted file in a third-party parser
        raise InputError(weights, f"not a readable safetensors file ({first_line(e)[:200]})") from None
    name = f"W_dec[{feature}]"
    vector = _checked_vector(weights, name, row)
    source = {
        "file": str(directory),
        "sha256": file_sha256(weights),
        "format": "sae",
        "feature": feature,
        "hook": hook,
    }
    return Foreign({layer: vector}, {layer: name}, source, None, {"config": config_path, "weights": weights})


def sae_layer(hook: str, where: Path | str = "cfg.json") -> int:
    """Our layer for a TransformerLens hook: ``blocks.L.hook_resid_post`` is the output of block L,
    layer L; ``blocks.L.hook_resid_pre`` is its input, the output of block L - 1. Other hooks (the
    attention or MLP outputs, resid_mid) are not the residual stream between blocks: refused."""
    match = _HOOK.fullmatch(hook)
    kind = match.group(2) if match else None
    if match is None or kind not in ("hook_resid_post", "hook_resid_pre"):
        raise InputError(
            where,
            f"hook '{hook}' does not read the residual stream between blocks: caa steers "
            "blocks.L.hook_resid_post (layer L) or blocks.L.hook_resid_pre (layer L - 1)",
            field="hook_name",
        )
    block = int(match.group(1))
    if kind == "hook_resid_post":
        return block
    if block == 0:
        raise InputError(
            where,
            f"hook '{hook}' is the input of block 0 (the embeddings), which caa does not steer: "
            "its layers are block outputs",
            field="hook_name",
        )
    return block - 1
