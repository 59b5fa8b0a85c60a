"""Every Parquet artifact of the pipeline: its schema (declared once), atomic writes, validated reads.

Each file carries one key-value metadata entry, ``caa``, holding JSON: the artifact kind and schema
version, the producing command and its options, the package version, the hashes of the inputs, and
(for model-dependent artifacts) the model fingerprint and prompt template.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import tempfile
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from caa.errors import CaaError, InputError
from caa.text import json_type, load_json

SCHEMA_VERSION = 1
META_KEY = b"caa"
_SPLIT = pa.dictionary(pa.int8(), pa.string())


@dataclass(frozen=True)
class Kind:
    """One artifact kind: its name, the command that makes it, and its columns.

    ``vector`` names the column holding a fixed-size float32 list of length d_model, if any; its
    size is fixed per file, so the schema is completed with ``schema(d)``.
    """

    name: str
    command: str
    fields: tuple[pa.Field, ...]
    vector: str | None = None

    def schema(self, d_model: int | None = None) -> pa.Schema:
        fields = list(self.fields)
        if self.vector is not None:
            if d_model is None:
                raise ValueError(f"the {self.name} schema needs d_model")
            fields.append(pa.field(self.vector, pa.list_(pa.float32(), d_model), nullable=False))
        return pa.schema(fields)


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


PAIRS = Kind(
    "pairs",
    "caa ingest",
    (
        _f("pair_id", pa.string()),
        _f("behavior", pa.string()),
        _f("format", pa.string()),  # "ab" or "freeform"
        _f("prompt", pa.string()),
        _f("positive", pa.string()),
        _f("negative", pa.string()),
        _f("split", _SPLIT),  # "train" or "test"
        _f("source", pa.string()),  # input file name
        _f("source_row", pa.string()),  # "line 12" / "index 3" / "row 7"
    ),
)

ACTIVATIONS = Kind(
    "activations",
    "caa extract",
    (
        _f("pair_id", pa.string()),
        _f("behavior", pa.string()),
        _f("split", _SPLIT),
        _f("side", pa.string()),  # "positive" or "negative"
        _f("layer", pa.int16()),
        _f("n_tokens", pa.int32()),  # tokens of the read text (prompt + completion)
    ),
    vector="activation",
)

VECTORS = Kind(
    "vectors",
    "caa compute-vectors",
    (
        _f("behavior", pa.string()),
        _f("layer", pa.int16()),
        _f("method", pa.string()),
        _f("n_train", pa.int32(), nullable=True),  # null for imported vectors (`caa import`)
        _f("n_test", pa.int32(), nullable=True),
        _f("vector_norm", pa.float64()),
        _f("mean_residual_norm", pa.float64(), nullable=True),  # null where unknown (imported)
        _f("norm_ratio", pa.float64(), nullable=True),  # vector_norm / mean_residual_norm
        _f("pair_consistency", pa.float64(), nullable=True),  # mean cos(pair difference, mean difference)
        _f("cos_prev_layer", pa.float64(), nullable=True),
        _f("cos_next_layer", pa.float64(), nullable=True),
        _f("test_accuracy", pa.float64(), nullable=True),
        _f("test_auc", pa.float64(), nullable=True),
    ),
    vector="vector",
)

SWEEP = Kind(
    "sweep",
    "caa sweep",
    (
        _f("behavior", pa.string()),
        _f("layer", pa.int16()),
        _f("multiplier", pa.float64()),
        _f("score_kind", pa.string()),  # "p_match" (A/B) or "logp_diff" (free-form)
        _f("score_mean", pa.float64()),
        _f("score_sem", pa.float64(), nullable=True),  # null with one item
        _f("n", pa.int32()),
        _f("delta", pa.float64()),  # score_mean minus the unsteered score_mean
        _f("delta_low", pa.float64(), nullable=True),  # paired 95% interval of delta over the items
        _f("delta_high", pa.float64(), nullable=True),
        _f("kl_mean", pa.float64()),  # mean KL(unsteered || steered) per token (metadata: over what)
        _f("perplexity", pa.float64()),
        _f("perplexity_delta", pa.float64()),
        # per (behavior, layer), repeated on its rows: items' slopes of score against multiplier
        _f("slope_mean", pa.float64(), nullable=True),
        _f("slope_median", pa.float64(), nullable=True),
        _f("anti_fraction", pa.float64(), nullable=True),  # share of items with a negative slope
        _f("anti_low", pa.float64(), nullable=True),  # its seeded bootstrap 95% interval
        _f("anti_high", pa.float64(), nullable=True),
        _f("backward_items", pa.list_(pa.string())),  # ids steering most strongly backwards
    ),
)

SWEEP_ITEMS = Kind(
    "sweep_items",
    "caa sweep",
    (
        _f("behavior", pa.string()),
        _f("layer", pa.int16()),
        _f("multiplier", pa.float64()),
        _f("pair_id", pa.string()),
        _f("score", pa.float64()),
        _f("slope", pa.float64(), nullable=True),  # the item's slope at this layer, on each of its rows
    ),
)

GENERATIONS = Kind(
    "generations",
    "caa generate",
    (
        _f("prompt_index", pa.int32()),
        _f("prompt", pa.string()),
        _f("behavior", pa.string()),
        _f("layer", pa.int16()),
        _f("multiplier", pa.float64()),
        _f("text", pa.string()),
        _f("n_tokens", pa.int32()),
    ),
)

KINDS = {k.name: k for k in (PAIRS, ACTIVATIONS, VECTORS, SWEEP, SWEEP_ITEMS, GENERATIONS)}


class ModelMeta(TypedDict, total=False):
    """The ``model`` entry: the fingerprint of the model an artifact was made with."""

    name: str
    source: str
    weights_hash: str
    architecture: str
    num_layers: int
    hidden_size: int
    dtype: str


class PromptMeta(TypedDict, total=False):
    """The ``prompt`` entry: how the texts were put to the model."""

    chat_template: bool
    position: str
    ab_position: str


class SourceMeta(TypedDict, total=False):
    """The ``source`` entry of imported vectors (`caa import`): where they came from."""

    file: str
    sha256: str
    format: str  # gguf, safetensors, npy, npz or sae
    feature: int | None  # the SAE feature (row of W_dec)
    hook: str | None  # the SAE's hook, e.g. blocks.12.hook_resid_post


class FluencyMeta(TypedDict, total=False):
    """The sweep's ``fluency`` entry: what its KL and perplexity were measured on."""

    kind: str  # "continuation" (greedy continuations of neutral prompts) or "text" (every position)
    texts: int
    tokens: int
    continuation_tokens: int | None
    source: str


# The 'caa' metadata entry, declared once: field -> the type of its JSON value (float: any number;
# a TypedDict: an object whose fields, where present, have those types). Readers use .get(), so a
# field is checked where present; fields not declared here are left alone.
META_FIELDS: dict[str, Any] = {
    "kind": str,
    "schema_version": int,
    "command": str,
    "options": dict[str, Any],
    "caa_version": str,
    "created": str,
    "inputs": dict[str, str],  # path -> SHA-256
}
META_FIELDS_OF_KIND: dict[str, dict[str, Any]] = {
    "pairs": {"counts": dict[str, dict[str, int]]},
    "activations": {"model": ModelMeta, "prompt": PromptMeta, "layers": list[int]},
    "vectors": {
        "model": ModelMeta | None,
        "prompt": PromptMeta | None,
        "layers": list[int],
        "behaviors": list[str],
        "train_pair_ids": list[str],
        "source": SourceMeta,
    },
    "sweep": {
        "model": ModelMeta,
        "prompt": PromptMeta | None,
        "recommended": dict[str, tuple[int, float] | None],  # behavior -> [layer, multiplier]
        "best_unreliable": dict[str, tuple[int, float] | None],  # the best gain, reliable or not
        "fluency": FluencyMeta,
    },
    "generations": {"model": ModelMeta},
}
META_FIELDS_OF_KIND["sweep_items"] = META_FIELDS_OF_KIND["sweep"]  # written by the same run


@dataclass
class Artifact:
    """A table read from disk with its parsed ``caa`` metadata."""

    path: Path
    table: pa.Table
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> dict[str, Any] | None:
        return self.meta.get("model")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_meta(
    kind: Kind, options: Mapping[str, Any], inputs: Mapping[str, Path] | None = None, **extra: Any
) -> dict[str, Any]:
    """The metadata every artifact carries: kind, version, command, options, input hashes, extras."""
    from caa import __version__

    meta: dict[str, Any] = {
        "kind": kind.name,
        "schema_version": SCHEMA_VERSION,
        "command": kind.command,
        "options": {k: _jsonable(v) for k, v in options.items()},
        "caa_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "inputs": {str(p): file_sha256(Path(p)) for p in (inputs or {}).values()},
    }
    meta.update(extra)
    return meta


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


@contextmanager
def atomic_paths(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield one new temporary beside each of ``paths``; rename them all onto ``paths`` only once the
    block succeeds, so the outputs of one run are replaced together or not at all.

    Each temporary has a unique name (``.NAME.XXXX.tmp``), so concurrent writers of one output never
    share one; it is synced to disk before the renames, and each directory after them. Every
    temporary is removed when the block fails, Ctrl-C included.
    """
    paths = [Path(p) for p in paths]
    _check_distinct(paths)
    tmps: list[Path] = []
    try:
        for path in paths:
            tmps.append(_new_temporary(path))
        yield list(tmps)
        for path in paths:
            _require_replaceable(path)  # e.g. a directory made there while the block ran
        for tmp, path in zip(tmps, paths, strict=True):
            _sync(tmp, path)
        for tmp, path in zip(tmps, paths, strict=True):
            _rename(tmp, path)
        for directory in dict.fromkeys(p.parent for p in paths):
            _sync_directory(directory)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def _check_distinct(paths: Sequence[Path]) -> None:
    for i, path in enumerate(paths):
        for other in paths[:i]:
            if _same_file(other, path):
                raise CaaError(f"{other} and {path}: two outputs of one run are the same file")


def _new_temporary(path: Path) -> Path:
    """An empty file with a unique name beside ``path``, readable as a file written the usual way."""
    _require_replaceable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CaaError(f"{path}: cannot write there ({e.strerror or e})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would not
    finally:
        os.close(fd)
    return Path(name)


def _require_replaceable(path: Path) -> None:
    if path.is_dir():
        raise CaaError(f"{path}: is a directory; give a file name to write")
    if path.exists() and not path.is_file():
        raise CaaError(f"{path}: is not a regular file; give a file name to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CaaError(f"{path}: cannot be created: {parent} is a file, not a directory")
            break


def _sync(tmp: Path, path: Path) -> None:
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise CaaError(f"{path}: cannot write there ({e.strerror or e})") from None


def _rename(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise CaaError(f"{path}: cannot write there ({e.strerror or e})") from None


def _sync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (a no-op where directories cannot be synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_parquet(table: pa.Table, file: Path, kind: Kind, meta: Mapping[str, Any]) -> None:
    """Write ``table`` as a ``kind`` artifact into ``file`` as it is, not atomically: ``file`` is a
    temporary of :func:`atomic_paths`, committed with the other outputs of its run."""
    d_model = _vector_size(table.schema, kind)
    table = table.cast(kind.schema(d_model)).replace_schema_metadata({META_KEY: json.dumps(meta)})
    pq.write_table(table, file)


def write_artifact(table: pa.Table, path: Path, kind: Kind, meta: Mapping[str, Any]) -> None:
    """Write ``table`` as a ``kind`` artifact, atomically (a unique temporary beside it, then rename)."""
    with atomic_path(Path(path)) as tmp:
        write_parquet(table, tmp, kind, meta)


# --- outputs, checked before any work ---------------------------------------------------------------

PLOT = Kind("plot", "caa sweep", ())
"""The sweep's PNG plot: not Parquet; declared so that it is checked like the other outputs."""
PNG_SOFTWARE = "caa sweep"  # the plot's PNG `Software` entry, by which a rerun knows its own plot
EXPORT = Kind("export", "caa export", ())
"""Vectors written for other tools (GGUF, safetensors, .npy, .npz): not Parquet; declared so that the
output is checked like the others. A GGUF or safetensors file carries EXPORT_MARKER, by which a rerun
knows its own file (a .npy or .npz has no place for it: replacing one takes --force)."""
EXPORT_MARKER = b"caa.export"
REPORT = Kind("report", "caa report", ())
"""`caa report`'s HTML page: not Parquet; declared so that it is checked like the other outputs."""
REPORT_GENERATOR = "caa report"  # the page's <meta name="generator">, by which a rerun knows its own page


def sweep_paths(out: Path) -> tuple[Path, Path, Path]:
    """The files of ``caa sweep -o OUT``, all beside OUT and distinct: the table (OUT), the per-item
    table (``STEM.items.parquet``) and the plot (``STEM.png``; ``STEM.plot.png`` if OUT is a .png)."""
    table = Path(out)
    if not table.name:
        raise CaaError(f"--out '{out}': give a file name to write")
    plot_suffix = ".plot.png" if table.suffix.lower() == ".png" else ".png"
    return table, table.with_name(table.stem + ".items.parquet"), table.with_name(table.stem + plot_suffix)


def check_outputs(
    inputs: Iterable[Path | None], outputs: Sequence[tuple[Path, Kind]], force: bool = False
) -> list[str]:
    """Refuse, before any work, outputs that would destroy data; the notices of files to be replaced.

    Refused: an output that is one of ``inputs`` (through a symlink, ``..`` or a hard link); two
    outputs that are one file; an output that is a directory or no regular file, or below a file;
    and an existing file that is not a caa artifact of the kind to be written there (a dataset,
    another stage's artifact) unless ``force``. A file of that kind (a rerun) is replaced.
    """
    outs = [(Path(path), kind) for path, kind in outputs]
    _check_distinct([path for path, _ in outs])
    for given in inputs:
        for path, _ in outs:
            if given is not None and _same_file(Path(given), path):
                raise CaaError(
                    f"{path}: is the input {given}; writing it would destroy that input: "
                    "choose another output"
                )
    notices = []
    for path, kind in outs:
        _require_replaceable(path)
        if not path.exists():
            continue
        found, what = _identify(path)
        if found == kind.name:
            notices.append(f"{path} exists ({what}): replacing it")
        elif force:
            notices.append(f"{path} exists ({what}): replacing it, as --force asks")
        else:
            raise CaaError(
                f"{path}: exists and is {what}, not a '{kind.name}' file; "
                "add --force to replace it, or choose another output"
            )
    return notices


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once symlinks and ``..`` are resolved,
    or (both existing) the same inode, as hard links are."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # one of them does not exist yet


def _identify(path: Path) -> tuple[str | None, str]:
    """The caa kind of an existing file (None if it is none) and how to call it in a message."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise CaaError(f"{path}: exists and cannot be read to tell what it is ({e.strerror or e})") from None
    if head.startswith(b"PAR1"):
        try:
            kind = read_meta(path).get("kind")
        except InputError:
            return None, "a Parquet file that is not a caa artifact"
        if kind in KINDS:
            return kind, f"a '{kind}' file from `{KINDS[kind].command}`"
        return None, f"a Parquet file of unknown kind {kind!r}"
    if head.startswith(b"\x89PNG"):
        if f"Software\0{PNG_SOFTWARE}".encode() in head:
            return PLOT.name, "a plot from `caa sweep`"
        if b"Software\0Matplotlib" in head:  # untagged: a plot from before caa tagged them
            return PLOT.name, "a Matplotlib plot, as an earlier `caa sweep` made it"
        return None, "a PNG image not made by caa"
    if head.startswith(b"GGUF") or head[8:22] == b'{"__metadata__':  # GGUF, safetensors
        if EXPORT_MARKER in head:
            return EXPORT.name, "a file from `caa export`"
        return None, "a GGUF file" if head.startswith(b"GGUF") else "a safetensors file"
    if f'<meta name="generator" content="{REPORT_GENERATOR} '.encode() in head:
        return REPORT.name, "a report from `caa report`"
    return None, "an empty file" if not head else "a file that is not a caa artifact"


class StreamWriter:
    """Write a ``kind`` artifact row group by row group; only a completed write becomes ``path``."""

    def __init__(self, path: Path, kind: Kind, meta: Mapping[str, Any], d_model: int | None = None):
        self.path = Path(path)
        self.schema = kind.schema(d_model).with_metadata({META_KEY: json.dumps(meta)})
        self._ctx = atomic_path(self.path)
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> StreamWriter:
        tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(tmp, self.schema)
        return self

    def write(self, columns: Mapping[str, Any]) -> None:
        """Append one row group given as column arrays (vectors as a [rows, d_model] array)."""
        self.write_table(columns_table(columns, self.schema))

    def write_table(self, table: pa.Table) -> None:
        """Append a table with this file's columns as one row group."""
        assert self._writer is not None
        self._writer.write_table(table.select(self.schema.names).cast(self.schema))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._writer is not None
        self._writer.close()
        self._ctx.__exit__(exc_type, exc, tb)


def columns_table(columns: Mapping[str, Any], schema: pa.Schema) -> pa.Table:
    """A table of ``schema`` from column arrays (a fixed-size-list column as a [rows, d] array)."""
    arrays = []
    for f in schema:
        col = columns[f.name]
        if pa.types.is_fixed_size_list(f.type):
            flat = pa.array(np.ascontiguousarray(col, dtype=np.float32).reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, f.type.list_size))
        else:
            arrays.append(pa.array(col, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _vector_size(schema: pa.Schema, kind: Kind) -> int | None:
    if kind.vector is None or kind.vector not in schema.names:
        return None
    t = schema.field(kind.vector).type
    return t.list_size if pa.types.is_fixed_size_list(t) else None


def require_file(path: Path) -> Path:
    """``path``, if it is an existing file; else an error saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a directory, not a file")
    if not path.is_file():
        raise InputError(path, "file not found")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    """The parsed ``caa`` metadata of a Parquet file, with clear errors for anything else."""
    path = require_file(path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(path, f"not a readable Parquet file ({e})") from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise InputError(path, "not a caa artifact: its Parquet metadata has no 'caa' entry")
    meta = load_json(raw, path, field="caa", what="the 'caa' metadata entry is not valid JSON")
    if not isinstance(meta, dict):
        raise InputError(path, "the 'caa' metadata entry is not a JSON object", field="caa")
    _check_meta(path, meta, META_FIELDS, "caa")  # the kind is a string from here on
    _check_meta(path, meta, META_FIELDS_OF_KIND.get(str(meta.get("kind")), {}), "caa")
    return meta


def _check_meta(path: Path, value: Any, spec: Any, name: str) -> None:
    """Raise naming the file and the field (``model.hidden_size``, ``layers[2]``) unless ``value``
    has the type ``spec`` (see META_FIELDS)."""
    origin, args = typing.get_origin(spec), typing.get_args(spec)
    if origin in (typing.Union, types.UnionType):  # the problem inside the option that fits is named
        inside = None
        for option in args:
            try:
                return _check_meta(path, value, option, name)
            except InputError as e:
                inside = inside or (e if e.field != name else None)
        if inside is not None:
            raise inside
    elif (isinstance(spec, dict) or typing.is_typeddict(spec)) and isinstance(value, dict):
        fields = spec if isinstance(spec, dict) else typing.get_type_hints(spec)
        for key, inner in fields.items():
            if key in value:
                _check_meta(path, value[key], inner, f"{name}.{key}".removeprefix("caa."))
        return
    elif origin is list and isinstance(value, list):
        for i, item in enumerate(value):
            _check_meta(path, item, args[0], f"{name}[{i}]")
        return
    elif origin is tuple and isinstance(value, list) and len(value) == len(args):
        for i, (item, inner) in enumerate(zip(value, args, strict=True)):
            _check_meta(path, item, inner, f"{name}[{i}]")
        return
    elif origin is dict and isinstance(value, dict):
        for key, item in value.items():
            _check_meta(path, item, args[1], f"{name}.{key}")
        return
    elif origin is None and _is_a(value, spec):
        return
    problem = f"expected {_describe(spec)} in the 'caa' metadata, found a JSON {json_type(value)}"
    raise InputError(path, problem, field=name)


def _is_a(value: Any, spec: Any) -> bool:
    if spec is Any:
        return True
    if typing.is_typeddict(spec):
        return False  # not a dict, or it would have been checked field by field
    if spec is None or spec is type(None):
        return value is None
    if spec is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, spec)


def _describe(spec: Any) -> str:
    """A type in words: ``a list of integers``, ``an object or null``."""
    plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
    single = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", type(None): "null"}
    origin, args = typing.get_origin(spec), typing.get_args(spec)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {plural.get(args[0], 'values')}"
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin is dict or typing.is_typeddict(spec):
        return "an object"
    return single.get(spec, str(spec))


def read_artifact(path: Path, kind: Kind, columns: Sequence[str] | None = None) -> Artifact:
    """Read and validate a ``kind`` artifact: its kind, schema version and every column's type
    (from the file's footer), then the values of ``columns`` (default: all), which must not be null
    where the schema says so."""
    path = Path(path)
    meta = read_meta(path)
    actual = meta.get("kind")
    if actual != kind.name:
        made_by = KINDS[actual].command if actual in KINDS else "something else"
        raise InputError(
            path,
            f"is a '{actual}' file (from `{made_by}`), expected a '{kind.name}' file from `{kind.command}`",
            field="kind",
        )
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(
            path,
            f"schema version {version!r}, this caa reads version {SCHEMA_VERSION}",
            field="schema_version",
        )
    schema = pq.read_schema(path)
    if kind.vector is not None:
        if kind.vector not in schema.names:
            raise InputError(path, "column missing", field=kind.vector)
        if _vector_size(schema, kind) is None:
            raise InputError(path, "column is not a fixed-size float32 list", field=kind.vector)
    expected = kind.schema(_vector_size(schema, kind))
    for f in expected:
        if f.name not in schema.names:
            raise InputError(path, "column missing", field=f.name)
        got = schema.field(f.name).type
        if got != f.type:
            raise InputError(path, f"column has type {got}, expected {f.type}", field=f.name)
    names = list(columns) if columns is not None else expected.names
    table = read_table(path, columns=names)
    for name in names:
        if not expected.field(name).nullable and table.column(name).null_count:
            raise InputError(path, "column has null values", field=name)
    return Artifact(path=path, table=table.select(names), meta=meta)


def read_table(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet file's table (or ``columns`` of it), with its text checked: Arrow does not check
    the UTF-8 of string columns on read, and converting a bad one to Python raises."""
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise InputError(path, f"not a readable Parquet file ({e})") from None
    for name in table.column_names:
        try:
            table.column(name).validate(full=True)
        except pa.ArrowInvalid as e:
            row = _bad_text_row(table.column(name))
            problem = "not valid UTF-8" if row else f"column is not valid ({e})"
            raise InputError(path, problem, where=row, field=name) from None
    return table


def _bad_text_row(column: pa.ChunkedArray) -> str | None:
    """``row N`` of the first value of a string column that is not UTF-8 (None if not found)."""
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        return None
    for row, value in enumerate(column.cast(pa.large_binary()).to_pylist()):
        try:
            if value is not None:
                value.decode("utf-8")
        except UnicodeDecodeError:
            return f"row {row}"
    return None


def vectors_of(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list column as a 2-D float32 array [rows, d], without Python loops."""
    col = table.column(column).combine_chunks()
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
