"""The control for the compiled serve tests: a plain Python forward hook on vLLM (no caa plugin) steers
eager and is silently lost compiled, which is why the plugin fills tables instead (tests/serve/
hook_control.py runs each engine in its own process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve.conftest import skip_without_vllm

skip_without_vllm()

pytestmark = pytest.mark.serve


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_control_a_plain_python_hook_steers_eager_and_is_lost_compiled(
    mode: str, tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    """Why the plugin fills tables: vLLM's torch.compile traces a Python hook once, at warm-up, while
    its delta is unset, and never runs it again (the plugin's compiled server steers exactly)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.serve.hook_control", str(tiny[0]), mode, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    moved = [line for line in done.stdout.splitlines() if line.startswith("MOVED ")]
    assert done.returncode == 0 and moved, done.stderr[-4000:]
    value = float(moved[0].split()[1])
    print(f"\n[serve] control, plain hook, {mode}: steering moved the logprobs by {value:.3g}")
    assert value > 0.1 if mode == "eager" else value == 0.0
