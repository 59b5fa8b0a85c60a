"""Every Parquet artifact of the pipeline: its schema (declared once), atomic writes, validated reads.

Each file carries one key-value metadata entry, ``caa``, holding JSON: the artifact kind and schema
version, the producing command and its options, the package version, the hashes of the inputs, and
(for model-dependent artifacts) the model fingerprint and prompt template.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from caa.errors import InputError

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
        _f("n_train", pa.int32()),
        _f("n_test", pa.int32()),
        _f("vector_norm", pa.float64()),
        _f("mean_residual_norm", pa.float64()),
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
        _f("score_sem", pa.float64()),
        _f("n", pa.int32()),
        _f("delta", pa.float64()),  # score_mean minus the unsteered score_mean
        _f("kl_mean", pa.float64()),  # mean KL(unsteered || steered) over neutral-text tokens
        _f("perplexity", pa.float64()),
        _f("perplexity_delta", pa.float64()),
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

KINDS = {k.name: k for k in (PAIRS, ACTIVATIONS, VECTORS, SWEEP, GENERATIONS)}


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


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_artifact(table: pa.Table, path: Path, kind: Kind, meta: Mapping[str, Any]) -> None:
    """Write ``table`` as a ``kind`` artifact, atomically (``path.tmp``, then rename)."""
    d_model = _vector_size(table.schema, kind)
    table = table.cast(kind.schema(d_model)).replace_schema_metadata({META_KEY: json.dumps(meta)})
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)


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
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(path, "the 'caa' metadata entry is not valid JSON", field="caa") from None
    if not isinstance(meta, dict):
        raise InputError(path, "the 'caa' metadata entry is not a JSON object", field="caa")
    return meta


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
    try:
        table = pq.read_table(path, columns=names)
    except (pa.ArrowException, OSError) as e:
        raise InputError(path, f"not a readable Parquet file ({e})") from None
    for name in names:
        if not expected.field(name).nullable and table.column(name).null_count:
            raise InputError(path, "column has null values", field=name)
    return Artifact(path=path, table=table.select(names), meta=meta)


def vectors_of(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list column as a 2-D float32 array [rows, d], without Python loops."""
    col = table.column(column).combine_chunks()
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
