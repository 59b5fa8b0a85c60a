"""The control for the compiled tests: a plain Python forward hook, whose delta lives in Python state,
on vLLM in this process (no caa plugin). Prints how far it moved the logprobs of one greedy
completion. ``python -m tests.serve.hook_control MODEL_DIR eager|compiled CACHE_DIR``."""

from __future__ import annotations

import os
import sys

MODEL, MODE, CACHE = sys.argv[1:4]
os.environ.update(
    VLLM_ENABLE_V1_MULTIPROCESSING="0",
    VLLM_CPU_KVCACHE_SPACE="1",
    VLLM_CPU_OMP_THREADS_BIND="nobind",
    VLLM_CACHE_ROOT=CACHE,
    VLLM_DISABLE_COMPILE_CACHE="1",
)
os.environ.pop("CAA_SERVE_VECTORS", None)

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.v1.worker.cpu_model_runner import CPUModelRunner  # noqa: E402

STATE: dict[str, torch.Tensor | None] = {"delta": None}
load = CPUModelRunner.load_model


def load_model(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    load(self, *args, **kwargs)

    def hook(module, inputs, output):  # type: ignore[no-untyped-def]
        delta = STATE["delta"]
        if delta is None:
            return output
        hidden, residual = output
        return hidden, residual + delta

    self.model.model.layers[2].register_forward_hook(hook)


CPUModelRunner.load_model = load_model  # type: ignore[method-assign]
llm = LLM(MODEL, dtype="float32", enforce_eager=MODE == "eager", max_model_len=256, max_num_seqs=4, seed=0)
params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0)


def logprobs() -> list[float]:
    out = llm.generate({"prompt_token_ids": [2, 40, 41, 42, 43, 44]}, params, use_tqdm=False)[0].outputs[0]
    return [next(iter(d.values())).logprob for d in out.logprobs]


plain = logprobs()
STATE["delta"] = torch.full((llm.llm_engine.model_config.get_hidden_size(),), 3.0)
steered = logprobs()
print(f"MOVED {max(abs(a - b) for a, b in zip(plain, steered, strict=True))!r}")
