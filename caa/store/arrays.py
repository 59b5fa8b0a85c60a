"""NumPy files (.npy, .npz), written with a note and read without trusting them.

A .npy header is a Python dict literal padded with spaces to 64 bytes; a note rides in it as a
comment after the dict (``{'descr': '<f4', ...} # {"caa.export": ...}``), which numpy skips (it reads
the header with ``ast.literal_eval``). An .npz is a zip archive of ``NAME.npy`` members; its note is
the zip's comment, which ``np.load`` ignores. Notes are JSON objects.

The readers take everything they can from the headers before any array is read: member names,
dtypes, shapes and sizes, so that an archive of a few kilobytes cannot unpack into gigabytes, and an
array of Python objects (a pickle) is refused, never loaded.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from caa.errors import InputError
from caa.store.text import first_line

MAX_VALUES = 1 << 20  # the values of one array: far beyond any model's hidden size
MAX_ARRAYS = 4096  # the members of an archive
MAX_BYTES = 1 << 28  # all of an archive's arrays together, uncompressed
_ALIGN = 64  # numpy aligns the data of a .npy file to 64 bytes
_HEADER_LIMIT = 10000  # numpy's own limit on a header it reads (max_header_size)


def read_npy(path: Path) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The array of a .npy file and its note (None if it has none)."""
    with open(path, "rb") as f:
        dtype, shape, fortran, note = _header(f, path, None)
        nbytes = _nbytes(path, None, dtype, shape)
        data = f.read(nbytes + 1)
    if len(data) != nbytes:
        size = "truncated" if len(data) < nbytes else "longer than its header says"
        raise InputError(path, f"{size}: shape {list(shape)} of {dtype} is {nbytes} bytes of data")
    return _array(data, dtype, shape, fortran), note


def read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """The arrays of an .npz archive (member ``NAME.npy`` as ``NAME``) and its note (None if none).
    Names, dtypes, shapes and sizes are checked from the zip directory and the members' headers
    before any array is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_ARRAYS:
                raise InputError(path, f"{len(members)} members; caa reads at most {MAX_ARRAYS}")
            names: dict[str, zipfile.ZipInfo] = {}
            for info in members:
                name = info.filename.removesuffix(".npy")
                if info.is_dir() or not info.filename.endswith(".npy"):
                    raise InputError(
                        path, "not a .npy member (an .npz holds arrays named NAME.npy)", field=info.filename
                    )
                if name in names:
                    raise InputError(path, "a second member of this name", field=name)
                names[name] = info
            total = sum(info.file_size for info in members)
            if total > MAX_BYTES:
                raise InputError(path, f"its arrays unpack to {total} bytes; caa reads at most {MAX_BYTES}")
            arrays = {name: _member(archive, info, path, name) for name, info in names.items()}
            note = _note(archive.comment)
    except InputError:
        raise
    except Exception as e:  # zipfile and zlib on an untrusted file: any failure means unreadable
        raise InputError(
            path, f"not a readable .npz archive ({type(e).__name__}: {_first_line(e)})"
        ) from None
    return arrays, note


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, name: str) -> np.ndarray:
    with archive.open(info) as f:
        dtype, shape, fortran, _ = _header(f, path, name)
        nbytes = _nbytes(path, name, dtype, shape)
        offset = f.tell()
        if info.file_size != offset + nbytes:
            raise InputError(
                path,
                f"its header declares shape {list(shape)} of {dtype} ({nbytes} bytes), but the member "
                f"holds {info.file_size - offset} bytes of data",
                field=name,
            )
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise InputError(path, "truncated member", field=name)
    return _array(data, dtype, shape, fortran)


def _header(f: IO[bytes], path: Path, name: str | None) -> tuple[np.dtype, tuple[int, ...], bool, Any]:
    """dtype, shape, order and note of the .npy stream ``f``, left at the start of its data."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        reader = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if reader is None:
            raise ValueError(f"npy format version {version[0]}.{version[1]}, which caa does not read")
        start = f.tell() + (2 if version == (1, 0) else 4)  # after the length field
        shape, fortran, dtype = reader(f, max_header_size=_HEADER_LIMIT)
        end = f.tell()
        f.seek(start)
        header = f.read(end - start).decode("latin1")  # the dict literal, then any comment

    except Exception as e:  # numpy's header parser on an untrusted file
        what = "not a readable .npy array" if name is None else "not a readable .npy member"
        raise InputError(path, f"{what} ({_first_line(e)})", field=name) from None
    if dtype.hasobject:
        raise InputError(path, "holds Python objects (a pickle), which caa never loads", field=name)
    _, _, comment = header.partition("}")
    return dtype, tuple(shape), bool(fortran), _note(comment.strip().removeprefix("#").strip())


def _nbytes(path: Path, name: str | None, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count > MAX_VALUES:
        raise InputError(
            path, f"shape {list(shape)}: {count} values; caa reads arrays of at most {MAX_VALUES}", field=name
        )
    return count * dtype.itemsize


def _array(data: bytes, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def _note(text: str | bytes) -> dict[str, Any] | None:
    try:
        note = json.loads(text) if text else None
    except (ValueError, UnicodeDecodeError):
        return None
    return note if isinstance(note, dict) else None


def _first_line(e: BaseException) -> str:
    text = first_line(e)[:200]
    if "pickle" in text:  # numpy's advice to load pickles is never passed on
        return "holds Python objects (a pickle), which caa never loads"
    return text


def npy_bytes(array: np.ndarray, note: Mapping[str, Any]) -> bytes:
    """A .npy file (format 1.0) of ``array`` with ``note`` as a comment in its header."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise ValueError("an array of Python objects cannot be written without pickling")
    fields = np.lib.format.header_data_from_array_1_0(array)
    literal = "{" + "".join(f"'{key}': {value!r}, " for key, value in sorted(fields.items())) + "}"
    text = f"{literal} # {json.dumps(dict(note), ensure_ascii=True)}" if note else literal
    if len(text) + 1 > _HEADER_LIMIT:  # numpy would refuse to read it: keep the array readable
        text = literal
    pad = -(len(text) + 1 + 10) % _ALIGN  # magic (6), version (2), length (2), text, "\n"
    header = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + array.tobytes()


def write_npy(path: Path, array: np.ndarray, note: Mapping[str, Any]) -> None:
    Path(path).write_bytes(npy_bytes(array, note))


def write_npz(path: Path, arrays: Mapping[str, np.ndarray], note: Mapping[str, Any]) -> None:
    """An .npz archive (stored, as ``np.savez`` writes it) of ``arrays``, ``note`` as its comment."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            archive.writestr(f"{name}.npy", npy_bytes(array, {}))
        archive.comment = json.dumps(dict(note), ensure_ascii=True).encode()[:65535]


def npy_note(head: bytes) -> dict[str, Any] | None:
    """The note in the header of a .npy file that starts with ``head`` (None if none is there)."""
    if not head.startswith(b"\x93NUMPY") or len(head) < 10:
        return None
    size, start = (int.from_bytes(head[8:10], "little"), 10) if head[6] == 1 else (0, 0)
    if head[6] == 2 and len(head) >= 12:
        size, start = int.from_bytes(head[8:12], "little"), 12
    _, _, comment = head[start : start + size].decode("latin1").partition("}")
    return _note(comment.strip().removeprefix("#").strip())


def npz_note(path: Path) -> dict[str, Any] | None:
    """The note of an .npz archive (its zip comment), None if it has none or is no zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _note(archive.comment)
    except Exception:  # not a readable zip archive: it has no note
        return None
