"""Every Parquet artifact of the pipeline: written atomically with its provenance, read validated.

The kinds and their columns are declared once in :mod:`caa.store.schemas`. Each file carries one key-value
metadata entry, ``caa``, holding JSON: the artifact kind and schema version, the producing command and
its options, the package version, the hashes of the inputs, and (for model-dependent artifacts) the
model fingerprint and prompt template, checked on read against the fields declared there.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from caa.errors import InputError
from caa.store.files import atomic_path, file_sha256
from caa.store.schemas import KINDS, META_FIELDS, META_FIELDS_OF_KIND, META_KEY, SCHEMA_VERSION, Kind
from caa.store.text import NAME_PROBLEM, behavior_name, json_type, load_json


@dataclass
class Artifact:
    """A table read from disk with its parsed ``caa`` metadata."""

    path: Path
    table: pa.Table
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> dict[str, Any] | None:
        return self.meta.get("model")


def make_meta(
    kind: Kind, options: Mapping[str, Any], inputs: Mapping[str, Path] | None = None, **extra: Any
) -> dict[str, Any]:
    """The metadata every artifact carries: kind, version, command, options, input hashes, extras."""
    meta: dict[str, Any] = {
        "kind": kind.name,
        "schema_version": kind.version,
        "command": kind.command,
        "options": {k: _jsonable(v) for k, v in options.items()},
        "caa_version": package_version(),
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


def write_parquet(table: pa.Table, file: Path, kind: Kind, meta: Mapping[str, Any]) -> None:
    """Write ``table`` as a ``kind`` artifact into ``file`` as it is, not atomically: ``file`` is a
    temporary of :func:`atomic_paths`, committed with the other outputs of its run. A column the
    kind ``added`` that ``table`` lacks is written null."""
    d_model = _vector_size(table.schema, kind)
    schema = kind.schema(d_model)
    for name, _, _ in kind.added:
        if name not in table.column_names:
            f = schema.field(name)
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    table = table.select(schema.names).cast(schema).replace_schema_metadata({META_KEY: json.dumps(meta)})
    pq.write_table(table, file)


def write_artifact(table: pa.Table, path: Path, kind: Kind, meta: Mapping[str, Any]) -> None:
    """Write ``table`` as a ``kind`` artifact, atomically (a unique temporary beside it, then rename)."""
    with atomic_path(Path(path)) as tmp:
        write_parquet(table, tmp, kind, meta)


def package_version() -> str:
    """This installation's version of caa (from its distribution's metadata)."""
    try:
        return importlib.metadata.version("caa")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


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
        failure = exc
        try:
            self._writer.close()  # writes the footer: on a full disk, this too fails
        except Exception as e:
            failure = failure or e
        if failure is None:
            self._ctx.__exit__(None, None, None)
            return
        self._ctx.__exit__(type(failure), failure, failure.__traceback__)  # a full disk: a WriteError
        if failure is not exc:
            raise failure


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
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():  # opening a FIFO would block, a device (/dev/zero) never ends
        raise InputError(path, "is not a regular file (a FIFO, a device or a socket): caa reads files only")
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
    elif (isinstance(spec, dict) or _is_record(spec)) and isinstance(value, dict):
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


def _is_record(spec: Any) -> bool:
    """Whether ``spec`` declares an object's fields (a TypedDict, or a dataclass such as
    :class:`caa.store.schemas.Fingerprint`)."""
    return typing.is_typeddict(spec) or (isinstance(spec, type) and is_dataclass(spec))


def _is_a(value: Any, spec: Any) -> bool:
    if spec is Any:
        return True
    if _is_record(spec):
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
    if origin is dict or _is_record(spec):
        return "an object"
    return single.get(spec, str(spec))


def read_artifact(path: Path, kind: Kind, columns: Sequence[str] | None = None) -> Artifact:
    """Read and validate a ``kind`` artifact: its kind, schema version and every column's type
    (from the file's footer), then the values of ``columns`` (default: all), which must not be null
    where the schema says so. A column the kind ``added`` after a file was written reads as nulls."""
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
    if not kind.reads(version):
        versions = ", ".join(map(str, range(SCHEMA_VERSION, kind.version + 1)))
        plural = "s" if kind.version > SCHEMA_VERSION else ""
        raise InputError(
            path,
            f"schema version {version!r}, this caa reads version{plural} {versions}",
            field="schema_version",
        )
    assert isinstance(version, int)
    missing = kind.missing_in(version)  # columns added since: filled with what the old file meant
    schema = pq.read_schema(path)
    if kind.vector is not None:
        if kind.vector not in schema.names:
            raise InputError(path, "column missing", field=kind.vector)
        if _vector_size(schema, kind) is None:
            raise InputError(path, "column is not a fixed-size float32 list", field=kind.vector)
    expected = kind.schema(_vector_size(schema, kind))
    for f in expected:
        if f.name in missing and f.name not in schema.names:
            continue
        if f.name not in schema.names:
            raise InputError(path, "column missing", field=f.name)
        got = schema.field(f.name).type
        if got != f.type:
            raise InputError(path, f"column has type {got}, expected {f.type}", field=f.name)
    names = list(columns) if columns is not None else expected.names
    table = read_table(path, columns=[n for n in names if n in schema.names])
    for name in names:
        if name not in table.column_names:
            filled = pa.array([missing[name]] * table.num_rows, expected.field(name).type)
            table = table.append_column(expected.field(name), filled)
    for name in names:
        if not expected.field(name).nullable and table.column(name).null_count:
            raise InputError(path, "column has null values", field=name)
    if "behavior" in names:
        table = _named(path, table)
    return Artifact(path=path, table=table.select(names), meta=meta)


def _named(path: Path, table: pa.Table) -> pa.Table:
    """``table`` with its behavior names as caa keeps them (NFC), a name that shows nothing refused
    (a file written elsewhere, or by a caa that kept names as they came)."""
    column = table.column("behavior")
    for value in pc.unique(column).to_pylist():
        if value is not None and behavior_name(value) is None:
            row = pc.index(column, value).as_py()
            raise InputError(path, NAME_PROBLEM, where=f"row {row}", field="behavior")
    if pc.all(pc.string_is_ascii(column)).as_py() is False:
        index = table.column_names.index("behavior")
        table = table.set_column(index, table.field(index), pc.utf8_normalize(column, form="NFC"))
    return table


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
