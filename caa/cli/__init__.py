"""The `caa` command line: parses options, calls the library, prints. No computation here.

One module per group of commands; importing them registers their commands on ``app`` in the order
``caa --help`` lists them (the pipeline's order, so the imports are not sorted). ``caa.cli:main``
(``app``, then a quick exit) is the console script and ``python -m caa``.
"""

import atexit
import os
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

# isort: off
from caa.cli.common import app, err, out
from caa.cli import data  # noqa: F401  ingest, datasets
from caa.cli import stages  # noqa: F401  extract, compute-vectors
from caa.cli import sweep  # noqa: F401
from caa.cli import generate  # noqa: F401
from caa.cli import files  # noqa: F401  report, export, import, inspect
from caa.cli import serve  # noqa: F401

# isort: on

__all__ = ["app", "err", "main", "out"]


def main() -> NoReturn:
    """Run the command line (:data:`app`) and end the process without tearing the interpreter down.

    Freeing several thousand modules and a model's objects one by one takes 0.5-2 s after a command
    has finished and written everything; the process skips it. The ``atexit`` handlers still run
    and the standard streams are flushed. Under torch.distributed (``accelerate launch``), or with
    another thread alive, the process exits normally. Output files never depend on the exit: they
    are written whole or not at all (as after a kill -9). Library callers and tests call ``app``.
    SIGTERM is handled as Ctrl-C (:func:`_on_sigterm`), then said in a line, with exit code 143.
    """
    code: object = 0
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main_thread else None
    try:
        app()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        code = 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if _terminated.is_set():
        err.print(f"terminated by SIGTERM: stopped as after Ctrl-C (exit code {SIGTERM_EXIT})")
        code = SIGTERM_EXIT
    if _others_alive():
        raise SystemExit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what SystemExit does with a message
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


SIGTERM_EXIT = 128 + signal.SIGTERM  # 143, as a shell reports a process SIGTERM ended
_terminated = threading.Event()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (kill, timeout, Slurm, docker stop) as Ctrl-C: a KeyboardInterrupt in the main thread,
    so every command's cleanup runs (temporaries removed, an extract's finished batches kept). A
    second SIGTERM during that cleanup is ignored: it would cut the cleanup short."""
    if not _terminated.is_set():
        _terminated.set()
        raise KeyboardInterrupt


def _others_alive() -> bool:
    """Whether a normal exit has work to wait for: other threads, or processes of torch.distributed."""
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        return True
    dist = sys.modules.get("torch.distributed")
    return bool(dist and dist.is_available() and dist.is_initialized())
