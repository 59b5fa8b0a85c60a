"""The outputs of a command, checked before any work: nothing that is not a rerun's own file is replaced.

An existing output is identified by its content (a caa artifact's kind, the mark of the sweep's plot,
of an export or of the report), never by its name; the sweep's several files are named here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from caa.errors import CaaError, InputError
from caa.store.arrays import npy_note, npz_note
from caa.store.artifacts import read_meta
from caa.store.files import check_distinct, check_name, require_replaceable, same_file
from caa.store.schemas import (
    EXPORT,
    EXPORT_MARKER,
    KINDS,
    PLOT,
    PNG_SOFTWARE,
    REPORT,
    REPORT_GENERATOR,
    Kind,
)


def sweep_paths(out: Path) -> tuple[Path, Path, Path]:
    """The files of ``caa sweep -o OUT``, all beside OUT and distinct: the table (OUT), the per-item
    table (``STEM.items.parquet``) and the plot (``STEM.png``; ``STEM.plot.png`` if OUT is a .png)."""
    table = Path(out)
    if not table.name:
        raise CaaError(f"--out '{out}': give a file name to write")
    plot_suffix = ".plot.png" if table.suffix.lower() == ".png" else ".png"
    return table, table.with_name(table.stem + ".items.parquet"), table.with_name(table.stem + plot_suffix)


def side_effects_path(out: Path) -> Path:
    """Where ``caa sweep -o OUT --side-effects ...`` writes its side effects: ``STEM.side_effects.parquet``
    beside OUT (with the sweep's other files, all or none)."""
    table = sweep_paths(out)[0]
    return table.with_name(table.stem + ".side_effects.parquet")


def check_outputs(
    inputs: Iterable[Path | None],
    outputs: Sequence[tuple[Path, Kind]],
    force: bool = False,
    directories: Sequence[Path] = (),
) -> list[str]:
    """Refuse, before any work, outputs that would destroy data or cannot be written; the notices of
    files to be replaced.

    Refused: an output that is one of ``inputs`` (through a symlink, ``..`` or a hard link), or an
    existing file inside an input that is a directory (a model's weights, an SAE's; a rerun's own
    artifact there excepted), with or without ``force``, and without suggesting it; two outputs that
    are one file; an output that is a directory or no regular file, or below a file; a name longer
    than the filesystem takes; an output whose directory cannot be written; and an existing file that
    is not a caa artifact of the kind to be written there (a dataset, another stage's artifact) unless
    ``force``. A file of that kind (a rerun) is replaced.
    ``directories`` are made beside the outputs as the run goes (extract's ``OUT.partial/``): their
    names and places are checked the same way.
    """
    outs = [(Path(path), kind) for path, kind in outputs]
    check_distinct([path for path, _ in outs])
    given = [Path(p) for p in inputs if p is not None]
    for path, _ in outs:
        _refuse_an_input(path, given)
    for path, _ in outs:
        require_replaceable(path)
        _require_writable(path)
    for directory in map(Path, directories):
        check_name(directory)
        _require_writable(directory, itself=True)
    notices = []
    for path, kind in outs:
        if not path.exists():
            continue
        found, what = _identify(path)
        inside = _directory_holding(path, given)
        if found == kind.name:
            notices.append(f"{path} exists ({what}): replacing it")
        elif inside is not None:
            raise CaaError(
                f"{path}: exists inside the input directory {inside} and is {what}; replacing it "
                "would destroy that input: choose another output"
            )
        elif force:
            notices.append(f"{path} exists ({what}): replacing it, as --force asks")
        else:
            raise CaaError(
                f"{path}: exists and is {what}, not a '{kind.name}' file; "
                "add --force to replace it, or choose another output"
            )
    return notices


def _refuse_an_input(path: Path, inputs: Sequence[Path]) -> None:
    for given in inputs:
        if same_file(given, path):
            raise CaaError(
                f"{path}: is the input {given}; writing it would destroy that input: choose another output"
            )


def _directory_holding(path: Path, inputs: Sequence[Path]) -> Path | None:
    """The input directory that ``path`` lies in (below it, symlinks resolved), if any."""
    real = os.path.realpath(path)
    for given in inputs:
        if os.path.isdir(given) and real.startswith(os.path.join(os.path.realpath(given), "")):
            return given
    return None


def _require_writable(path: Path, itself: bool = False) -> None:
    """Refuse an output whose directory (or the nearest one that exists, where it will be made; with
    ``itself``, the directory ``path`` if it exists) cannot be written: found now, not after the run."""
    for directory in (path, *path.parents) if itself else path.parents:
        if os.path.isdir(directory):
            if not os.access(directory, os.W_OK | os.X_OK):
                raise CaaError(
                    f"{path}: cannot be written: the directory {directory} is not writable "
                    "(read-only, or no permission)"
                )
            return


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
    if head.startswith((b"\x93NUMPY", b"PK\x03\x04", b"PK\x05\x06")):  # .npy; .npz, .pt (zip archives)
        npy = head.startswith(b"\x93NUMPY")
        note = npy_note(head) if npy else npz_note(path)  # the header's comment, the zip's comment
        if note is not None and EXPORT_MARKER.decode() in note:
            return EXPORT.name, "a file from `caa export`"
        return None, "a .npy array not made by caa" if npy else "a zip archive (.npz, .pt) not made by caa"
    if f'<meta name="generator" content="{REPORT_GENERATOR} '.encode() in head:
        return REPORT.name, "a report from `caa report`"
    return None, "an empty file" if not head else "a file that is not a caa artifact"
