"""The `caa` command line: parses options, calls the library, prints. No computation here.

One module per group of commands; importing them registers their commands on ``app`` in the order
``caa --help`` lists them (the pipeline's order, so the imports are not sorted). ``caa.cli:app`` is
the console script.
"""

# isort: off
from caa.cli.common import app, err, out
from caa.cli import data  # noqa: F401  ingest, datasets
from caa.cli import stages  # noqa: F401  extract, compute-vectors
from caa.cli import sweep  # noqa: F401
from caa.cli import generate  # noqa: F401
from caa.cli import files  # noqa: F401  report, export, import, inspect

# isort: on

__all__ = ["app", "err", "out"]
