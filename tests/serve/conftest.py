"""What the serve tests share: whether vLLM can be imported here, and the tiny model they serve."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def _tiny_llama(directory: Path) -> Path:
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
    torch.manual_seed(0)
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
