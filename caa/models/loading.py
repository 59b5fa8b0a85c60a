"""Load a causal language model by embedded alias, local directory, GGUF file or hub id; find its blocks.

A model's decoder blocks are found per architecture; its fingerprint (name, source, weights hash,
architecture, sizes, dtype) goes into every artifact made with it. What a model argument names is
told in :mod:`caa.models.specs`; embedded models and the GGUF cache are :mod:`caa.models.cache`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from caa.errors import ModelError
from caa.models.cache import EMBEDDED, Progress, embedded_gguf, gguf_directory, gguf_hash
from caa.models.specs import looks_like_path, read_config, require_reachable
from caa.store.schemas import Fingerprint
from caa.store.text import first_line

DEFAULT_MODEL = "smollm2-135m"


# Where each architecture keeps its decoder blocks (attribute path from the *ForCausalLM module).
_BLOCK_PATHS: dict[str, tuple[str, ...]] = {
    "llama": ("model.layers",),
    "mistral": ("model.layers",),
    "mixtral": ("model.layers",),
    "qwen2": ("model.layers",),
    "qwen3": ("model.layers",),
    "gemma": ("model.layers",),
    "gemma2": ("model.layers",),
    "gemma3_text": ("model.layers",),
    "gemma3": ("model.language_model.layers", "model.layers"),
    "phi3": ("model.layers",),
    "olmo2": ("model.layers",),
    "gpt2": ("transformer.h",),
    "gpt_neox": ("gpt_neox.layers",),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_BLOCK_PATHS))


@dataclass
class LoadedModel:
    """A model ready for caa: the module, its tokenizer, its decoder blocks and its fingerprint."""

    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    blocks: nn.ModuleList
    fingerprint: Fingerprint

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.fingerprint.hidden_size

    @property
    def context_length(self) -> int | None:
        """The most positions the model takes (None when its config does not say)."""
        config = self.model.config.get_text_config()
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_dtype(dtype: str, device: str | torch.device | None = None) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU and float32 on the CPU; otherwise the named dtype."""
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype == "auto":
        on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_gpu else torch.float32
    if dtype not in names:
        raise ModelError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return names[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    spec: Any = DEFAULT_MODEL,
    *,
    tokenizer: Any = None,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> LoadedModel:
    """Load a causal LM for caa.

    ``spec`` is an embedded alias (``smollm2-135m``), a local transformers directory, a ``.gguf``
    file, or a hub id (works when its files are reachable or already cached). The model is put in
    eval mode on ``device`` (default: the GPU if there is one), or placed by ``device_map``.
    ``spec`` may also be a transformers model already in memory, with its ``tokenizer``: it is used
    where it is, as it is (:func:`wrap_model`).
    """
    if not isinstance(spec, (str, os.PathLike)):
        if tokenizer is None:
            raise ModelError("load_model(model, tokenizer=...): a model object needs its tokenizer")
        return wrap_model(spec, tokenizer)
    spec = str(spec)
    torch_dtype = resolve_dtype(dtype, device)  # an option error before any slow step
    directory, name, source, weights_hash = _resolve(spec, progress)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, **kwargs)
    except SafetensorError as e:  # a weights file cut short (an interrupted download) or damaged
        raise ModelError(_bad_weights(spec, directory, e)) from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        # transformers reports a malformed config or weights file with any of these
        local = directory != spec or Path(spec).exists()
        where = directory if local else "the Hugging Face Hub (not reachable and not cached?)"
        raise ModelError(f"could not load model '{spec}' from {where}: {first_line(e)}") from None
    if device_map is None:
        model.to(torch.device(device) if device is not None else default_device())  # type: ignore[arg-type]
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if weights_hash is None:
        weights_hash = "hub:" + str(getattr(model.config, "_commit_hash", None) or "unknown")
    blocks = decoder_blocks(model)
    text_config = model.config.get_text_config()
    fingerprint = Fingerprint(
        name=name,
        source=source,
        weights_hash=weights_hash,
        architecture=model.config.model_type,
        num_layers=len(blocks),
        hidden_size=int(text_config.hidden_size),
        dtype=str(torch_dtype).removeprefix("torch."),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, blocks=blocks, fingerprint=fingerprint)


def wrap_model(model: Any, tokenizer: Any, name: str | None = None) -> LoadedModel:
    """A transformers model and tokenizer already in memory, as a :class:`LoadedModel`.

    Its fingerprint hashes the config and a sample of every parameter (shape, dtype, the first 4096
    values), so artifacts made with it are refused with another model, as for a loaded one."""
    blocks = decoder_blocks(model)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for key, value in model.state_dict().items():
            sample = value.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes()
            digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode() + sample)
    text_config = model.config.get_text_config()
    label = name or str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
    fingerprint = Fingerprint(
        name=label,
        source="in-memory model object",
        weights_hash="object:" + digest.hexdigest(),
        architecture=model.config.model_type,
        num_layers=len(blocks),
        hidden_size=int(text_config.hidden_size),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, blocks=blocks, fingerprint=fingerprint)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a supported architecture, in order (block l outputs "layer l")."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    paths = _BLOCK_PATHS.get(str(model_type))
    if paths is None:
        raise ModelError(
            f"unsupported architecture '{model_type}': caa knows the decoder blocks of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for path in paths:
        obj: Any = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelError(f"architecture '{model_type}': no decoder blocks at {' or '.join(paths)}")


def resolve_model(spec: str, progress: Progress | None = None) -> tuple[str, str, str | None]:
    """Where ``spec``'s transformers files are, without loading them (an embedded alias or a .gguf
    is converted once, into the cache), its display name, and its weights hash (None for a hub id):
    what a fingerprint check needs, for a process other than this one to load the model."""
    directory, name, _, weights_hash = _resolve(spec, progress)
    return directory, name, weights_hash


def block_hookpoint(architecture: str, layer: int) -> str:
    """The module name of decoder block ``layer`` below the model's ``base_model`` (``layers.13`` for
    Llama, ``h.13`` for GPT-2): the names lm-evaluation-harness's steered model hooks. Every block path
    starts at the ``base_model_prefix`` of the class AutoModelForCausalLM builds (for ``gemma3``,
    Gemma3ForConditionalGeneration: its first path), so the name is that path without its first step."""
    paths = _BLOCK_PATHS.get(architecture)
    if paths is None:
        raise ModelError(
            f"unsupported architecture '{architecture}': caa knows the decoder blocks of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return f"{paths[0].partition('.')[2]}.{layer}"


def _resolve(spec: str, progress: Progress | None) -> tuple[str, str, str, str | None]:
    """(directory to load, display name, source, weights hash or None for hub ids)."""
    if spec in EMBEDDED:
        gguf = embedded_gguf(spec)
        digest = gguf_hash(gguf)
        directory = gguf_directory(gguf, digest, progress, EMBEDDED[spec].cache_dtype)
        return directory, spec, str(gguf), digest
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        digest = gguf_hash(path)
        return gguf_directory(path, digest, progress), path.stem, str(path.resolve()), digest
    if path.is_dir():
        read_config(path)
        return str(path), path.name, str(path.resolve()), directory_hash(path)
    if path.exists():
        raise ModelError(f"unknown model '{spec}': a file, but not a .gguf file or a model directory")
    if looks_like_path(spec):
        raise ModelError(f"no such model directory or file: '{spec}'")
    if spec.count("/") == 1:
        require_reachable(spec)
        return spec, spec, f"hub:{spec}", None
    raise ModelError(
        f"unknown model '{spec}': not an embedded alias ({', '.join(EMBEDDED)}), "
        "an existing directory, a .gguf file, or a hub id of the form org/name"
    )


def _bad_weights(spec: str, directory: str, e: Exception) -> str:
    """The message for a weights file that safetensors cannot read, naming the file where it is local."""
    from safetensors import safe_open

    for weights in sorted(Path(directory).glob("*.safetensors")) if Path(directory).is_dir() else []:
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as bad:
            return (
                f"could not load model '{spec}': {weights}: not a readable safetensors file "
                f"({first_line(bad)}); cut short or damaged (an interrupted download?): fetch it again"
            )
    return f"could not load model '{spec}' from {directory}: a weights file is damaged: {first_line(e)}"


def directory_hash(path: Path) -> str:
    """A fast content fingerprint of a model directory: config plus each weight file's name, size,
    and first and last MiB (hashing many GB of weights on every run would cost more than it tells)."""
    h = hashlib.sha256()
    config = path / "config.json"
    h.update(config.read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}|{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return "dir:" + h.hexdigest()
