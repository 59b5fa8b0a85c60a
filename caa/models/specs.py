"""What a model argument names, and what its config declares, told without loading it or the network.

A model is an embedded alias, a ``.gguf`` file, a transformers directory or a hub id; a name that can
only be a path is never sent to the hub, and a hub id is refused at once while the hub is switched off
and the model is not cached. The config's layer count lets ``--layers`` be checked before a slow load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from caa.errors import CaaError, InputError, ModelError
from caa.models.cache import EMBEDDED, converted
from caa.store.text import json_type, load_json

# Endings of files that people pass for a model (weights, configs, datasets): never a hub id.
FILE_SUFFIXES = frozenset(
    {".bin", ".ckpt", ".csv", ".gguf", ".ggml", ".gz", ".h5", ".json", ".jsonl", ".model", ".msgpack"}
    | {".npy", ".npz", ".onnx", ".parquet", ".pt", ".pth", ".safetensors", ".tar", ".txt", ".zip"}
)


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` can only be meant as a local path: it starts with ``.``, ``/`` or ``~``, has
    more than one separator (a hub id has exactly one) or ends in a file suffix."""
    seps = spec.count("/") + (spec.count(os.sep) if os.sep != "/" else 0)
    return spec.startswith((".", "/", "~", os.sep)) or seps > 1 or Path(spec).suffix.lower() in FILE_SUFFIXES


def hub_offline() -> bool:
    """Whether the user has switched the Hugging Face Hub off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    flags = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_cached_config(repo_id: str) -> Path | None:
    """The cached config.json of a hub model, if the local hub cache has it (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except (ValueError, OSError):  # an id the hub would refuse, an unreadable cache
        return None
    return Path(found) if isinstance(found, str) else None


def require_reachable(repo_id: str) -> None:
    """With the hub switched off, a hub id that is not cached fails now, not after retries."""
    if hub_offline() and _hub_cached_config(repo_id) is None:
        raise ModelError(
            f"could not load model '{repo_id}' from the Hugging Face Hub: the hub is offline "
            "(HF_HUB_OFFLINE is set) and the model is not in the local cache"
        )


def read_config(directory: Path) -> dict[str, Any]:
    """A model directory's config.json, which must be a JSON object."""
    config = directory / "config.json"
    if not config.is_file():
        raise ModelError(f"{directory} is a directory but has no config.json: not a transformers model")
    try:
        data = config.read_bytes()
    except OSError as e:
        raise ModelError(f"{config}: cannot be read ({e.strerror or e})") from None
    doc = load_json(data, config, what="is not a valid JSON file")
    if not isinstance(doc, dict):
        raise InputError(
            config, f"is not a model config: expected a JSON object, found a JSON {json_type(doc)}"
        )
    if not isinstance(doc.get("model_type", ""), str):
        raise InputError(config, "expected a string", field="model_type")
    return doc


MAX_LAYERS = 10_000  # a config claiming more is not believed (``--layers all`` would list them)


def config_num_layers(spec: str) -> int | None:
    """The number of decoder blocks that ``spec``'s config declares, read without loading the model
    or the network (None when the config is not at hand: a GGUF not converted yet, a hub model not
    cached), so that --layers is checked before the model loads."""
    path = Path(spec).expanduser()
    try:
        if spec in EMBEDDED or path.suffix.lower() == ".gguf":
            directory = converted(spec)
            config = read_config(directory) if directory else None
        elif path.is_dir():
            config = read_config(path)
        elif spec.count("/") == 1 and not looks_like_path(spec):
            cached = _hub_cached_config(spec)
            config = read_config(cached.parent) if cached else None
        else:
            config = None
    except CaaError:
        return None  # loading the model reports it
    if config is None:
        return None
    for section in (config, config.get("text_config")):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_LAYERS:
                return value
    return None
