"""What the serve tests share: whether vLLM can be imported here, and the tiny model they serve."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from caa.core.hooks import deltas, steer_start, steering
from caa.stages.vectors import VectorSet
from tests.helpers import make_vectors
from tests.tiny_models import make_tokenizer


@functools.cache
def vllm_problem() -> str | None:
    """Why ``import vllm`` fails in this environment (tried in a child: the test process never imports
    vLLM, each engine is its own process), or None."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import vllm, transformers"], capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired:
        return "import vllm took over 180 s"
    lines = done.stderr.strip().splitlines()
    return None if done.returncode == 0 else (lines[-1] if lines else f"exit {done.returncode}")


def skip_without_vllm() -> None:
    """Skip the calling test module where vLLM cannot be imported, or fail it where vLLM is required
    (``CAA_REQUIRE_VLLM``: `make test` runs the serve tests so, and they must not skip there)."""
    problem = vllm_problem()
    if problem is None:
        return
    if os.environ.get("CAA_REQUIRE_VLLM"):
        pytest.fail(f"vLLM is required here (CAA_REQUIRE_VLLM) but not usable: {problem}", pytrace=False)
    pytest.skip(f"vLLM is not usable here ({problem}): make test-serve", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End the server and every engine process it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            # the group outlives its leader while an engine process is still exiting
            os.killpg(proc.pid, 0)
            time.sleep(1)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue


def _tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A tiny random Llama with head_dim 32, saved with the tests' tokenizer."""
    import transformers as tf

    tokenizer = make_tokenizer()
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model directory, vectors.parquet of behaviors agree and mood at every layer)."""
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAA_CACHE", str(root / "caa-cache"))
        model = _tiny_llama(root / "model")
        _, vectors = make_vectors(model, root)
    return model, vectors


@pytest.fixture(scope="session")
def other_vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vectors.parquet of another tiny model of the same shape (other random weights)."""
    root = tmp_path_factory.mktemp("serve-other")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAA_CACHE", str(root / "caa-cache"))
        return make_vectors(_tiny_llama(root / "model", seed=1), root)[1]


@pytest.fixture(scope="session")
def reference(tiny: tuple[Path, Path]) -> Any:
    """``reference(ids, prompt_length, steer)``: the logprob of each token 1..end of ``ids`` under
    caa's steering hook on the transformers model (float32), as ``caa generate`` steers; ``steer`` has
    the flat keys (``caa_scale`` as ``--scale``), or a ``vector`` of its own besides them."""
    from transformers import AutoModelForCausalLM

    model_dir, vectors_path = tiny
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vectors = VectorSet.read(vectors_path)

    def run(ids: list[int], prompt_length: int, steer: dict[str, Any] | None) -> list[float]:
        x = torch.tensor([ids])
        with torch.no_grad():
            if steer is None:
                logits = model(x).logits
            else:
                vector = steer.get("vector")
                if vector is None:
                    scale = steer.get("caa_scale", "raw")
                    vector = torch.from_numpy(
                        vectors.vector(steer["caa_behavior"], steer["caa_layer"], scale).copy()
                    )
                start = steer_start(steer.get("caa_positions", "answer"), prompt_length)
                delta = {steer["caa_layer"]: deltas(vector, [steer["caa_multiplier"]])}
                with steering(model.model.layers, delta, start=start):
                    logits = model(x).logits
        lp = torch.log_softmax(logits[0, :-1].double(), -1)
        return lp.gather(1, x[0, 1:, None]).squeeze(1).tolist()

    return run
