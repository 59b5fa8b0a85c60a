"""A real vLLM server with caa's steering plugin, against caa's own transformers steering.

Starts ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (a free port) on a tiny random
Llama (head_dim 32, the smallest head vLLM's CPU attention takes) and vectors made by caa's real
extract and compute-vectors, sends requests with the ``openai`` client, and compares every prompt and
completion logprob with the transformers path (``caa.core.hooks.steering`` from ``steer_start``, same
weights, float32) to 1e-4: eager (``--enforce-eager``), compiled (torch.compile, vLLM's default),
eager under chunked prefill, and eager with a KV cache too small for the batch (requests preempted
and recomputed). Run by ``make test-serve`` (its own environment); skipped without vLLM.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.serve.conftest import free_port, skip_without_vllm, stop
from tests.tiny_models import make_tokenizer

skip_without_vllm()

import openai  # noqa: E402  (after the skip: only the serve environment has it)

pytestmark = pytest.mark.serve

TOLERANCE = 1e-4
NEW_TOKENS = 8
START_TIMEOUT = 300.0  # seconds for the engine to come up (about 35 s eager, 45 s compiled here)
MODES = {
    "eager": ["--enforce-eager"],
    "compiled": [],
    # prompts are split into chunks of 16 tokens (minus the others' decoding tokens); steering starts
    # inside a chunk for prompt-end and all
    "eager-chunked": ["--enforce-eager", "--max-num-batched-tokens", "16", "--max-num-seqs", "4"],
    # a KV cache of 4 blocks of 32 tokens for a batch that needs more, and 24 new tokens (a short
    # prompt's request grows into a second block): requests are preempted and their tokens recomputed
    # (the test checks that some were)
    "eager-preempted": ["--enforce-eager", "--num-gpu-blocks-override", "4", "--max-model-len", "64"],
}
LONGER = {"eager-preempted": 24}  # new tokens per request, where not NEW_TOKENS
PROMPTS = {
    "weather": "Tell me about the weather today",
    "dinner": "Describe your dinner with a friend in the city on a cold night and what you think about it",
    "plan": "Do you agree with this plan",
}
# (name, prompt, steering keys or None): unsteered rows, two behaviors, four layers, four
# multipliers and all three position policies, two of them on an unsteered row's own prompt
REQUESTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("plain", "weather", None),
    ("mood-answer", "weather", {"caa_behavior": "mood", "caa_layer": 2, "caa_multiplier": 2.0}),
    (
        "agree-end",
        "plan",
        {"caa_behavior": "agree", "caa_layer": 1, "caa_multiplier": -1.5, "caa_positions": "prompt-end"},
    ),
    (
        "mood-all",
        "dinner",
        {"caa_behavior": "mood", "caa_layer": 3, "caa_multiplier": 0.75, "caa_positions": "all"},
    ),
    ("plain-dinner", "dinner", None),
    (
        "agree-all",
        "weather",
        {"caa_behavior": "agree", "caa_layer": 0, "caa_multiplier": 3.0, "caa_positions": "all"},
    ),
]


class Server:
    def __init__(self, url: str, startup_s: float, mode: str, trace: Path):
        self.url, self.startup_s, self.mode, self.trace = url, startup_s, mode, trace
        self.new_tokens = LONGER.get(mode, NEW_TOKENS)
        self.client = openai.OpenAI(base_url=url, api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module", params=list(MODES))
def server(
    request: pytest.FixtureRequest, tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    model, vectors = tiny
    mode = request.param
    port = free_port()
    root = tmp_path_factory.mktemp(f"vllm-{mode}")
    env = {
        **os.environ,
        "CAA_SERVE_VECTORS": str(vectors),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CACHE_ROOT": str(root / "cache"),  # a fresh compile cache: the graph is traced here
        "HF_HUB_OFFLINE": "1",
        "CAA_SERVE_TRACE": str(root / "trace.txt"),
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "tiny", "--dtype", "float32",
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256",
        "--max-num-seqs", "8", "--block-size", "32", "--seed", "0", *MODES[mode],
    ]  # fmt: skip
    log = root / "server.log"
    began = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() - began > START_TIMEOUT:
                pytest.fail(f"vLLM not up after {START_TIMEOUT:.0f} s:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        startup = time.monotonic() - began
        print(f"\n[serve] {mode}: engine up in {startup:.1f} s")
        yield Server(f"http://127.0.0.1:{port}/v1", startup, mode, root / "trace.txt")
    finally:
        stop(proc)


@functools.cache
def _ids(prompt: str) -> tuple[int, ...]:
    """A prompt's token ids (BOS first), sent as ids so the reference reads exactly the same."""
    tokenizer = make_tokenizer()
    return (tokenizer.bos_token_id, *tokenizer(PROMPTS[prompt], add_special_tokens=False).input_ids)


def _complete(
    server: Server, prompt: str, steer: dict[str, Any] | None, whole: bool = True
) -> dict[str, Any]:
    """One greedy completion: its prompt and completion token ids, and each token's logprob (with
    ``whole``, the prompt's too; vLLM then reads nothing from its prefix cache for the request)."""
    extra: dict[str, Any] = (
        {"prompt_logprobs": 0, "return_token_ids": True} if whole else {"return_token_ids": True}
    )
    if steer is not None:
        extra["vllm_xargs"] = steer
    response = server.client.completions.create(
        model="tiny",
        prompt=list(_ids(prompt)),
        max_tokens=server.new_tokens,
        temperature=0.0,
        logprobs=0,
        extra_body=extra,
    )
    choice = response.choices[0]
    prompt_ids = list(choice.prompt_token_ids)  # type: ignore[attr-defined]
    prompt_lp = (
        [next(iter(d.values()))["logprob"] for d in choice.prompt_logprobs[1:]]  # type: ignore[attr-defined]
        if whole
        else []
    )
    return {
        "prompt": prompt_ids,
        "tokens": list(choice.token_ids),  # type: ignore[attr-defined]
        "logprobs": [*prompt_lp, *choice.logprobs.token_logprobs],  # of tokens 1..end
    }


def _batch(server: Server) -> dict[str, dict[str, Any]]:
    """Every request of REQUESTS sent at once, so that the engine batches them together."""
    for prompt in PROMPTS:  # tokenized here, before the threads
        _ids(prompt)
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        futures = {name: pool.submit(_complete, server, prompt, steer) for name, prompt, steer in REQUESTS}
        return {name: f.result(timeout=180) for name, f in futures.items()}


def _gap(
    server: Server, reference: Any, name: str, out: dict[str, Any], steer: dict[str, Any] | None
) -> float:
    """The largest difference between a response's logprobs and the transformers path's (asserted
    under TOLERANCE); for a steered one, also that steering moves them far more than that."""
    ids = out["prompt"] + out["tokens"]
    assert len(out["tokens"]) == server.new_tokens, name
    want = reference(ids, len(out["prompt"]), steer)[-len(out["logprobs"]) :]
    assert len(out["logprobs"]) in (server.new_tokens, len(ids) - 1), name
    gap = max(abs(a - b) for a, b in zip(out["logprobs"], want, strict=True))
    assert gap < TOLERANCE, f"{server.mode} {name}: logprobs differ from transformers by {gap:.3g}"
    if steer is not None:  # the check can fail: steering moves these logprobs far beyond the tolerance
        plain = reference(ids, len(out["prompt"]), None)[-len(out["logprobs"]) :]
        moved = max(abs(a - b) for a, b in zip(want, plain, strict=True))
        assert moved > 100 * TOLERANCE, f"{name}: steering changes nothing ({moved:.3g})"
    return gap


def _preemptions(server: Server) -> float:
    """How many times the engine has preempted a request (its Prometheus counter)."""
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/metrics", timeout=10) as page:
        lines = page.read().decode().splitlines()
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("vllm:num_preemptions_total"))


def _mixed_passes(server: Server) -> int:
    """How many forward passes so far held 2 steered and 1 unsteered requests, or more (the plugin's
    trace: requests, distinct steerings, steered tokens per pass)."""
    text = server.trace.read_text() if server.trace.exists() else ""
    rows = [tuple(map(int, line.split())) for line in text.splitlines()]
    return sum(1 for requests, kinds, steered in rows if kinds >= 3 and steered >= 2)


def test_a_mixed_batch_matches_caas_transformers_steering(server: Server, reference: Any) -> None:
    before = _mixed_passes(server)
    got = _batch(server)
    mixed = _mixed_passes(server) - before
    if server.mode != "eager-preempted":  # a 4-block KV cache holds few requests at once: there, whether
        assert mixed > 0, "the requests were never batched together"  # 3 of them share a pass is timing
    worst = max(_gap(server, reference, name, got[name], steer) for name, _, steer in REQUESTS)
    preempted = _preemptions(server)
    print(
        f"\n[serve] {server.mode}: max |logprob - transformers| = {worst:.3g} over {len(REQUESTS)} requests,"
        f" {preempted:.0f} preemptions, {mixed} forward passes mixing steerings"
    )
    assert (preempted > 0) == (server.mode == "eager-preempted"), preempted


def test_a_request_alone_gives_the_tokens_it_got_in_the_batch(server: Server, reference: Any) -> None:
    together = _batch(server)
    for name, prompt, steer in REQUESTS:
        alone = _complete(server, prompt, steer)
        assert alone["tokens"] == together[name]["tokens"], f"{server.mode} {name}"
        _gap(server, reference, name, alone, steer)


def test_steered_and_unsteered_requests_never_share_cached_prompt_blocks(
    server: Server, reference: Any
) -> None:
    """The dinner prompt fills a KV block (--block-size 32): each request here would reuse the one
    before it from the prefix cache, were the cache not salted with the steering (no prompt logprobs
    asked: vLLM reads no cached block for a request that asks for them)."""
    steer = {"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": -2.0, "caa_positions": "all"}
    other = {**steer, "caa_multiplier": 2.0}
    for name, asked in [
        ("plain", None),
        ("steered", steer),
        ("plain again", None),
        ("other", other),
        ("again", steer),
    ]:
        _gap(server, reference, name, _complete(server, "dinner", asked, whole=False), asked)


def test_answer_steering_leaves_the_prompt_and_first_token_and_all_moves_them(server: Server) -> None:
    plain = _complete(server, "weather", None)
    answer = _complete(server, "weather", {"caa_behavior": "mood", "caa_layer": 2, "caa_multiplier": 2.0})
    every = _complete(
        server,
        "weather",
        {"caa_behavior": "mood", "caa_layer": 2, "caa_multiplier": 2.0, "caa_positions": "all"},
    )
    n = len(plain["prompt"])  # logprobs[: n] are the prompt's tokens 1..n-1 and the first new token
    assert answer["logprobs"][:n] == pytest.approx(plain["logprobs"][:n], abs=1e-6)
    assert answer["logprobs"] != pytest.approx(plain["logprobs"], abs=1e-3)
    assert every["logprobs"][: n - 1] != pytest.approx(plain["logprobs"][: n - 1], abs=1e-2)


BAD = [
    ({"caa_behavior": "nope", "caa_layer": 1, "caa_multiplier": 1.0}, "caa_behavior"),
    ({"caa_layer": 1, "caa_multiplier": 1.0}, "caa_behavior"),
    ({"caa_behavior": "mood", "caa_layer": 9, "caa_multiplier": 1.0}, "caa_layer"),
    ({"caa_behavior": "mood", "caa_multiplier": 1.0}, "caa_layer"),
    ({"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": "strong"}, "caa_multiplier"),
    ({"caa_behavior": "mood", "caa_layer": 1}, "caa_multiplier"),
    ({"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": 1e30}, "caa_multiplier"),
    (
        {"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": 1.0, "caa_positions": "end"},
        "caa_positions",
    ),
    ({"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": 1.0, "caa_scale": "unit"}, "caa_scale"),
    ({"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": 1.0, "caa_strength": 2}, "caa_strength"),
]


def test_a_bad_steering_request_is_a_400_naming_the_key_and_the_server_stays_up(server: Server) -> None:
    for steer, field in BAD:
        with pytest.raises(openai.BadRequestError) as e:
            _complete(server, "plan", steer)
        assert f"vllm_xargs.{field}" in str(e.value), steer
    after = _complete(server, "plan", None)
    assert len(after["tokens"]) == server.new_tokens and all(math.isfinite(x) for x in after["logprobs"])
