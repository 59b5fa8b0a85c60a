"""Shared pieces of the benchmark runner (scripts/bench.py): the models it runs, the pairs it feeds
them, timing, log-log fits and the result rows every section returns.

Model shapes (``--shape``):
- ``smollm2``: the embedded SmolLM2-135M-Instruct, real weights (the default);
- ``tiny``, ``llama-1b``, ``llama-8b``: a randomly initialised ``LlamaForCausalLM`` with that
  architecture's config (bfloat16 for the Llama shapes), no weights needed. Their tokenizer is
  SmolLM2's: its 49,152 ids all lie inside Llama 3's 128,256-row embedding, so real text is fed
  unchanged (no ids clamped, no random ids); the tiny shape's vocabulary is exactly SmolLM2's.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from caa.models.loading import LoadedModel, load_model  # noqa: E402
from caa.stages.ingest import ingest, pairs_table  # noqa: E402

DATA = ROOT / "data"
EMBEDDED = "smollm2-135m"
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Published configs: Llama 3.2 1B (meta-llama/Llama-3.2-1B) and Llama 3.1 8B (meta-llama/Llama-3.1-8B).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
    },
    "llama-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
    },
}
SHAPE_NAMES = ("smollm2", *SHAPES)
TOKENIZER_NOTE = (
    "tokenizer: SmolLM2's (49,152 ids, all inside the shape's embedding; real text, no ids clamped)"
)


@dataclass
class Bench:
    """What every section gets: the model, the options, a scratch directory and the progress log."""

    loaded: LoadedModel
    shape: str
    device: str
    quick: bool
    workdir: Path
    model_label: str
    log: Callable[[str], None]

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any], repeat: int | None = None) -> tuple[float, Any]:
        """Seconds ``fn`` takes (the GPU's queue drained before and after) and its value. On a GPU,
        by default, the best of three calls: the first also pays the allocator's growth and the
        libraries' lazy set-up, which on a GPU can outlast a whole call of a small grid."""
        best, value = float("inf"), None
        for _ in range(repeat or (3 if self.cuda else 1)):
            self.sync()
            start = time.perf_counter()
            value = fn()
            self.sync()
            best = min(best, time.perf_counter() - start)
        return best, value

    def pick(self, quick: Any, full: Any, gpu: Any = None) -> Any:
        """The quick or the full grid's value; ``gpu``: the full grid's on a GPU, where the CPU's
        grid runs in fractions of a second (too short to time)."""
        if self.quick:
            return quick
        return gpu if self.cuda and gpu is not None else full


@dataclass
class Section:
    """One section of the results: rows of (measure, value, unit, vs, ratio), a setup line, notes."""

    title: str
    setup: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)  # measured points behind a fitted number

    def add(
        self,
        measure: str,
        value: float,
        unit: str,
        vs: str | None = None,
        ratio: float | None = None,
        headline: bool = False,
    ) -> None:
        """``ratio``: this measure against ``vs`` (a limit, or a peer timed in the same run)."""
        self.rows.append(
            {
                "measure": measure,
                "value": float(value),
                "unit": unit,
                "vs": vs,
                "ratio": None if ratio is None else float(ratio),
                "headline": headline,
            }
        )

    def to_dict(self, seconds: float) -> dict[str, Any]:
        return {
            "title": self.title,
            "setup": self.setup,
            "rows": self.rows,
            "notes": self.notes,
            "series": self.series,
            "seconds": seconds,
        }


def load_bench_model(
    shape: str, device: str, dtype: str = "auto", tokenizer: Path | None = None
) -> tuple[LoadedModel, str]:
    """The model of ``shape`` on ``device``, and a label saying what it is. ``tokenizer``: a
    directory holding SmolLM2's tokenizer files, for the random shapes on a machine without the
    embedded model (a GPU box with no network); by default it is the embedded model's."""
    if shape == "smollm2" or tokenizer is None:
        embedded = load_model(EMBEDDED, device=device, dtype=dtype)
        if shape == "smollm2":
            label = f"SmolLM2-135M-Instruct (embedded weights, {embedded.fingerprint.dtype})"
            return embedded, label
        tok = embedded.tokenizer
        del embedded
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch_dtype = torch.float32 if shape == "tiny" else torch.bfloat16
    if dtype != "auto":
        torch_dtype = getattr(
            torch, {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(dtype, dtype)
        )
    config = LlamaConfig(
        **SHAPES[shape],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # build in the target dtype: an 8B model never exists in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    loaded = load_model(model, tokenizer=tok)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    dtype_name = str(torch_dtype).removeprefix("torch.")
    label = f"random-weight LlamaForCausalLM, {shape} shape ({n:.2f} B parameters, {dtype_name}); "
    return loaded, label + TOKENIZER_NOTE


def real_pairs(behavior: str, test_fraction: float = 0.2) -> pd.DataFrame:
    """The built-in dataset ``behavior`` as a pairs frame (split as strings)."""
    source = next(p for p in DATA.iterdir() if p.stem == behavior and p.suffix in (".json", ".jsonl"))
    frame = pairs_table(ingest([source], test_fraction=test_fraction).pairs).to_pandas()
    frame["split"] = frame["split"].astype(str)
    return frame


FILLER = ("the", "weather", "in", "the", "city", "was", "quite", "warm", "and", "park", "full")


def filler(words: int, seed: int) -> str:
    """``words`` words of plain text, different per ``seed``."""
    return " ".join(FILLER[(seed + i) % len(FILLER)] for i in range(words))


def synthetic_records(n: int, words: int = 0, ab: bool = False) -> list[dict[str, str]]:
    """``n`` short contrastive pairs (free-form, or A/B questions), each ``words`` words longer."""
    records = []
    for i in range(n):
        pad = (" " + filler(words, i)) if words else ""
        if ab:
            question = (
                f"Is day {i} a good day?{pad}\n\nChoices:\n (A) Yes, day {i} is good.\n (B) No, it is not."
            )
            records.append(
                {
                    "question": question,
                    "answer_matching_behavior": "(A)",
                    "answer_not_matching_behavior": "(B)",
                }
            )
        else:
            records.append(
                {
                    "prompt": f"Tell me about day {i}.{pad}",
                    "positive": f"Day {i} was a good day.",
                    "negative": f"Day {i} was a bad day.",
                }
            )
    return records


def write_jsonl(records: Sequence[dict[str, str]], path: Path) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def loglog_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The slope of a least-squares line through (log x, log y): y grows as x ** slope."""
    slope, _ = np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)
    return float(slope)


def spread_layers(n_layers: int, count: int) -> list[int]:
    """``count`` layers spread over the middle of the model (where steering works best)."""
    return sorted({round(n_layers * (k + 1) / (count + 1)) for k in range(count)})


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' progress bars and advisories while a section runs."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
