"""What a server refuses at start-up: vectors made with another model (the fingerprint check
``caa generate`` makes) stop the engine with a message naming the file and the field."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serve.conftest import free_port, skip_without_vllm, stop

skip_without_vllm()

pytestmark = pytest.mark.serve


def test_vectors_of_another_model_stop_the_server_naming_the_field(
    tiny: tuple[Path, Path], other_vectors: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "CAA_SERVE_VECTORS": str(other_vectors),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CACHE_ROOT": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny[0]),
        "--dtype", "float32", "--host", "127.0.0.1", "--port", str(free_port()), "--max-model-len", "256",
        "--enforce-eager",
    ]  # fmt: skip
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        text = log.read_text()
        assert proc.returncode not in (None, 0), f"the server did not stop:\n{text[-3000:]}"
        assert f"{other_vectors}: field 'model.weights_hash' is 'dir:" in text
        assert "these vectors were made with another model" in text
    finally:
        stop(proc)
