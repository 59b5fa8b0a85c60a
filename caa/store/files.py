"""Files on disk: every write that must be all or nothing, and the one SHA-256 of a file's bytes.

A writer writes to a unique temporary beside its target (``.NAME.XXXX.tmp``, NAME shortened with a
hash where that would be too long a name), syncs it and renames it into place, so a crash never leaves
a file that looks complete; the artifacts, the report, the exports, the pieces of a resumable run and
the model cache all write this way. A write the disk refuses inside a writer (full, over quota or
``ulimit -f``, read-only) becomes a :class:`WriteError` naming the target, the temporary removed.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from caa.errors import CaaError

_BLOCK = 1 << 22  # bytes read at a time when hashing or copying


class WriteError(CaaError):
    """An output that the disk refuses to write; ``oserror`` says why."""

    def __init__(self, message: str, oserror: OSError):
        super().__init__(message)
        self.oserror = oserror


class SpecialFileError(OSError):
    """A file that is no regular file (a device, a pipe, a directory): it is never read."""


def file_sha256(*paths: Path, copy_to: BinaryIO | None = None) -> str:
    """SHA-256 of the bytes of ``paths`` one after another (usually one file), streamed in blocks.

    Only regular files are read (a device, a pipe or a /proc file could block or never end:
    :class:`SpecialFileError`), and never past the size each had when opened. With ``copy_to`` the
    bytes are written there too: a copy and its hash in one read."""
    h = hashlib.sha256()
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        try:
            info = os.fstat(fd)  # of what was opened, not of what the name points to by now
            if not stat.S_ISREG(info.st_mode):
                raise SpecialFileError(f"{path}: not a regular file")
            left = info.st_size
            while left > 0 and (block := os.read(fd, min(left, _BLOCK))):
                h.update(block)
                if copy_to is not None:
                    copy_to.write(block)
                left -= len(block)
        finally:
            os.close(fd)
    return h.hexdigest()


@contextmanager
def atomic_paths(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield one new temporary beside each of ``paths``; rename them all onto ``paths`` only once the
    block succeeds, so the outputs of one run are replaced together or not at all.

    Each temporary has a unique name (``.NAME.XXXX.tmp``), so concurrent writers of one output never
    share one; it is synced to disk before the renames, and each directory after them. Every
    temporary is removed when the block fails, Ctrl-C (and SIGTERM, which the CLI turns into it)
    included; a write the disk refused in the block is a :class:`WriteError` naming the outputs.
    """
    paths = [Path(p) for p in paths]
    check_distinct(paths)
    tmps: list[Path] = []
    try:
        for path in paths:
            tmps.append(_new_temporary(path))
        try:
            yield list(tmps)
        except Exception as e:  # the writer's own failure: a full disk becomes a WriteError
            _raise_if_disk_refused(e, _written(paths, tmps, e))
            raise
        for path in paths:
            require_replaceable(path)  # e.g. a directory made there while the block ran
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` into ``path`` all or nothing (see :func:`atomic_paths`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a new temporary directory beside ``path``, renamed to ``path`` if the block succeeds.

    If a directory ``path`` exists by then (another process made it first), it is kept and the new
    one dropped: a directory is written once, by whichever writer finishes first. The temporary is
    removed in any case."""
    path = Path(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp"))
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a plain mkdir would not
        try:
            yield tmp
        except Exception as e:  # e.g. a full disk while the directory's files are written
            _raise_if_disk_refused(e, path)
            raise
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_distinct(paths: Sequence[Path]) -> None:
    """Refuse two outputs of one run that are one file."""
    for i, path in enumerate(paths):
        for other in paths[:i]:
            if same_file(other, path):
                raise CaaError(f"{other} and {path}: two outputs of one run are the same file")


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once symlinks and ``..`` are resolved,
    or (both existing) the same inode, as hard links are."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # one of them does not exist yet


def require_replaceable(path: Path) -> None:
    """Refuse an output that is a directory or no regular file, or that lies below a file, or whose
    name (or a directory's on the way) is longer than the filesystem takes."""
    try:
        _require_replaceable(path)
    except OSError as e:  # e.g. a path longer than the system takes in all
        raise CaaError(f"{path}: cannot be written ({e.strerror or e})") from None


def check_name(path: Path) -> None:
    """Refuse a path with a name (its own or a directory's on the way) longer than the filesystem takes."""
    limit = name_max(_existing_ancestor(path.parent))
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise CaaError(
                f"{path}: a file name of {len(os.fsencode(part))} bytes, and this "
                f"filesystem takes at most {limit}: choose a shorter name"
            )


def _require_replaceable(path: Path) -> None:
    check_name(path)
    if path.is_dir():
        raise CaaError(f"{path}: is a directory; give a file name to write")
    if path.exists() and not path.is_file():
        raise CaaError(f"{path}: is not a regular file; give a file name to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CaaError(f"{path}: cannot be created: {parent} is a file, not a directory")
            break


def _new_temporary(path: Path) -> Path:
    """An empty file with a unique name beside ``path``, readable as a file written the usual way."""
    require_replaceable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would not
    finally:
        os.close(fd)
    return Path(name)


_TEMPORARY_EXTRA = len(".") + 8 + len(".tmp")  # tempfile's random part, then the suffix
_DISK_REFUSED = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


def name_max(directory: Path) -> int:
    """The longest file name (in bytes) that ``directory``'s filesystem takes (255 if it cannot tell)."""
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _temporary_prefix(path: Path) -> str:
    """The start of the temporary's name beside ``path``: ``.NAME.``, or, where that would make a name
    longer than the filesystem takes, the start of NAME and a hash of all of it (``.NAMESTART~HASH.``)."""
    prefix = f".{path.name}."
    limit = name_max(_existing_ancestor(path.parent))
    if len(os.fsencode(prefix)) + _TEMPORARY_EXTRA <= limit:
        return prefix
    digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:12]
    keep = os.fsencode(path.name)[: max(0, limit - _TEMPORARY_EXTRA - len(digest) - 3)]
    return f".{keep.decode(errors='ignore')}~{digest}."


def _existing_ancestor(directory: Path) -> Path:
    """The nearest of ``directory`` and its parents that is an existing directory."""
    for candidate in (directory, *directory.parents):
        try:
            if os.path.isdir(candidate):  # False, never an error, for a name too long
                return candidate
        except ValueError:
            pass
    return Path(".")


def disk_refusal(e: BaseException) -> OSError | None:
    """The OSError of a write the disk refused (full, over quota, over ``ulimit -f``, read-only, an
    I/O error) behind ``e``, or None. safetensors reports one as a SafetensorError naming the OS
    error's number; pyarrow as an OSError; Python as an OSError."""
    if isinstance(e, OSError):
        return e if e.errno in _DISK_REFUSED else None
    if type(e).__name__ == "SafetensorError":  # safetensors' own class; not imported for it
        found = re.search(r"os error (\d+)|code: (\d+)", str(e))
        code = int(next(g for g in found.groups() if g)) if found else None
        if code in _DISK_REFUSED:
            return OSError(code, os.strerror(code))
    return None


def _raise_if_disk_refused(e: Exception, path: Path | str) -> None:
    refused = disk_refusal(e)
    if refused is not None:
        why = os.strerror(refused.errno) if refused.errno else str(refused)  # pyarrow's strerror is long
        raise WriteError(f"{path}: cannot write there ({why})", refused) from None


def _written(paths: Sequence[Path], tmps: Sequence[Path], e: Exception) -> str:
    """The output whose temporary a failure names, else every output of the block."""
    for path, tmp in zip(paths, tmps, strict=True):
        if getattr(e, "filename", None) is not None and Path(e.filename) == tmp:  # type: ignore[attr-defined]
            return str(path)
    return ", ".join(str(p) for p in paths)


def _sync(tmp: Path, path: Path) -> None:
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _cannot_write(path, e) from None


def _rename(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise _cannot_write(path, e) from None


def _cannot_write(path: Path, e: OSError) -> WriteError:
    return WriteError(f"{path}: cannot write there ({e.strerror or e})", e)


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
