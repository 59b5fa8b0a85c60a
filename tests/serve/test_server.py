"""``caa serve`` for real: the command starts vLLM's server with caa's plugins, prints where and how to
ask, steers requests that ask in the nested ``steering`` object as caa's transformers steering does,
lists and adds vectors without a restart, guards every /v1 route with the API key, refuses a model it
cannot steer in one line, and on SIGTERM leaves no process running. Run in .venv-serve (make test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from caa.stages.vectors import VectorSet
from tests.serve.conftest import free_port, skip_without_vllm, stop
from tests.tiny_models import make_tokenizer

skip_without_vllm()

import openai  # noqa: E402  (after the skip: only the serve environment has it)

pytestmark = pytest.mark.serve

KEY = "test-key-1"
TOLERANCE = 1e-4
START_TIMEOUT = 400.0
PROMPT = "Tell me about the weather today"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    out: Path
    err: Path
    client: openai.OpenAI


def _env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }


def _caa_serve(root: Path, args: list[str]) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = root / "stdout.txt", root / "stderr.txt"
    command = [sys.executable, "-m", "caa", "serve", *args]
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(command, env=_env(root), stdout=o, stderr=e, start_new_session=True, cwd=root)
    return proc, out, err


@pytest.fixture(scope="module")
def served(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model, vectors = tiny
    root = tmp_path_factory.mktemp("caa-serve")
    port = free_port()
    args = [
        str(vectors), "-m", str(model), "--port", str(port), "--api-key", KEY, "--max-vectors", "10",
        "--steerable-layers", "all", "--vllm-python", sys.executable,
        "--", "--enforce-eager", "--dtype", "float32", "--max-model-len", "256", "--block-size", "32",
        "--seed", "0",
    ]  # fmt: skip
    proc, out, err = _caa_serve(root, args)
    began = time.monotonic()
    try:
        while "is up" not in out.read_text():
            if proc.poll() is not None:
                pytest.fail(f"caa serve exited with {proc.returncode}:\n{err.read_text()[-4000:]}")
            if time.monotonic() - began > START_TIMEOUT:
                pytest.fail(f"caa serve not up after {START_TIMEOUT:.0f} s:\n{err.read_text()[-4000:]}")
            time.sleep(1)
        print(f"\n[serve] caa serve up in {time.monotonic() - began:.1f} s")
        url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key=KEY, timeout=120, max_retries=0)
        yield Served(proc, url, out, err, client)
    finally:
        stop(proc)


def _ids() -> list[int]:
    tokenizer = make_tokenizer()
    return [tokenizer.bos_token_id, *tokenizer(PROMPT, add_special_tokens=False).input_ids]


def _complete(served: Served, **extra: Any) -> tuple[list[int], list[int], list[float]]:
    """Prompt ids, new token ids and the logprobs of tokens 1..end of one greedy completion."""
    response = served.client.completions.create(
        model="model",
        prompt=_ids(),
        max_tokens=6,
        temperature=0.0,
        logprobs=0,
        extra_body={"prompt_logprobs": 0, "return_token_ids": True, **extra},
    )
    choice = response.choices[0]
    prompt_lp = [next(iter(d.values()))["logprob"] for d in choice.prompt_logprobs[1:]]  # type: ignore[attr-defined]
    return (
        list(choice.prompt_token_ids),  # type: ignore[attr-defined]
        list(choice.token_ids),  # type: ignore[attr-defined]
        [*prompt_lp, *choice.logprobs.token_logprobs],  # type: ignore[union-attr]
    )


def _http(served: Served, method: str, body: Any = None, key: str | None = KEY) -> tuple[int, Any]:
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{served.url}/steering/vectors", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as page:
            return page.status, json.loads(page.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_it_prints_where_it_serves_what_it_loaded_and_a_request_to_copy(served: Served) -> None:
    text = served.out.read_text()
    assert f"caa serve is up: {served.url} (model 'model')" in text
    assert "agree" in text and "mood" in text and "0, 1, 2, 3" in text
    assert f"curl {served.url}/chat/completions" in text and "Authorization: Bearer $CAA_API_KEY" in text
    assert '"steering": {"behavior": "agree", "layer": 3, "multiplier": 2.0}' in text
    assert KEY not in text  # the key itself is never printed


@pytest.mark.parametrize(
    "steer",
    [
        {"behavior": "mood", "layer": 2, "multiplier": 2.0},
        {"behavior": "agree", "layer": 1, "multiplier": -1.5, "positions": "prompt-end"},
        {"behavior": "mood", "layer": 3, "multiplier": 0.5, "positions": "all", "scale": "residual"},
    ],
)
def test_nested_steering_is_the_flat_keys_and_caas_transformers_steering(
    served: Served, reference: Any, steer: dict[str, Any]
) -> None:
    flat = {f"caa_{k}": v for k, v in steer.items()}
    prompt, tokens, nested_lp = _complete(served, steering=steer)
    _, flat_tokens, flat_lp = _complete(served, vllm_xargs=flat)
    assert tokens == flat_tokens and nested_lp == flat_lp
    want = reference(prompt + tokens, len(prompt), flat)
    plain = reference(prompt + tokens, len(prompt), None)
    gap = max(abs(a - b) for a, b in zip(nested_lp, want, strict=True))
    assert gap < TOLERANCE, gap
    assert max(abs(a - b) for a, b in zip(want, plain, strict=True)) > 100 * TOLERANCE


def test_a_chat_request_steers_alike_streamed_or_not(served: Served) -> None:
    steer = {"behavior": "mood", "layer": 2, "multiplier": 3.0, "positions": "all"}
    messages = [{"role": "user", "content": "Describe your morning."}]

    def chat(**extra: Any) -> str:
        reply = served.client.chat.completions.create(
            model="model",
            messages=messages,
            max_tokens=8,
            temperature=0.0,
            extra_body=extra,  # type: ignore[arg-type]
        )
        return reply.choices[0].message.content or ""

    steered, plain = chat(steering=steer), chat()
    assert steered == chat(vllm_xargs={f"caa_{k}": v for k, v in steer.items()}) and steered != plain
    stream = served.client.chat.completions.create(
        model="model", messages=messages, max_tokens=8, temperature=0.0, stream=True,  # type: ignore[arg-type]
        extra_body={"steering": steer},
    )  # fmt: skip
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == steered


@pytest.mark.parametrize(
    ("steering", "field"),
    [
        ({"behavior": "nope", "layer": 1, "multiplier": 1.0}, "steering.behavior"),
        ({"behavior": "mood", "layer": 9, "multiplier": 1.0}, "steering.layer"),
        ({"behavior": "mood", "layer": 1, "multiplier": 1e30}, "steering.multiplier"),
        ({"behavior": "mood", "layer": 1, "multiplier": 1.0, "positions": "end"}, "steering.positions"),
        ({"behavior": "mood", "layer": 1, "multiplier": 1.0, "scale": "unit"}, "steering.scale"),
        ({"behavior": "mood", "layer": 1, "multiplier": 1.0, "strength": 2}, "steering.strength"),
        ("mood", "steering"),
    ],
)
def test_a_bad_nested_request_is_a_400_naming_the_field(served: Served, steering: Any, field: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        _complete(served, steering=steering)
    assert f"{field}:" in str(e.value)
    with pytest.raises(openai.BadRequestError, match=r"steering\.behavior"):  # streamed: a 400 as well
        served.client.completions.create(
            model="model", prompt="hi", max_tokens=2, stream=True, extra_body={"steering": {"behavior": "x"}}
        )
    assert len(_complete(served)[1]) == 6  # the server stays up


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_multiplier_that_is_not_finite_is_a_400(served: Served, value: str) -> None:
    """JSON has no NaN or infinity, but Python's json (so vLLM's server) reads them: the openai client
    cannot send them, a hand-written body can."""
    body = (
        '{"model": "model", "prompt": "hi", "max_tokens": 2, '
        f'"steering": {{"behavior": "mood", "layer": 1, "multiplier": {value}}}}}'
    ).encode()
    request = urllib.request.Request(f"{served.url}/completions", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", f"Bearer {KEY}")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    answer = e.value.read().decode()
    assert e.value.code == 400 and "steering.multiplier: " in answer and "is not finite" in answer, answer


def test_every_v1_route_needs_the_api_key(served: Served) -> None:
    stranger = openai.OpenAI(base_url=served.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model="model", prompt="hi", max_tokens=2)
    assert _http(served, "GET", key=None)[0] == 401
    assert _http(served, "POST", {"behavior": "x", "layer": 0, "vector": [0.0] * 64}, key="wrong")[0] == 401
    assert _http(served, "GET")[0] == 200


def test_vectors_are_listed_and_added_without_a_restart(
    served: Served, tiny: tuple[Path, Path], reference: Any
) -> None:
    vectors = VectorSet.read(tiny[1])
    status, listing = _http(served, "GET")
    assert status == 200 and listing["max_vectors"] == 10 and listing["steerable_layers"] == [0, 1, 2, 3]
    assert listing["model"]["weights_hash"] == vectors.meta["model"]["weights_hash"]
    got = {(v["behavior"], v["layer"]): v["norm"] for v in listing["vectors"]}
    for (b, layer), norm in got.items():
        assert norm == pytest.approx(float(np.linalg.norm(vectors.vector(b, layer))), rel=1e-6)
    fresh = (-2.0 * vectors.vector("agree", 2)).tolist()  # a vector the file does not hold
    status, added = _http(served, "POST", {"model": vectors.meta["model"], "vectors": [
        {"behavior": "fresh", "layer": 2, "vector": fresh}]})  # fmt: skip
    assert status == 200 and added["added"] == [{"behavior": "fresh", "layer": 2}] and added["vectors"] == 9
    prompt, tokens, logprobs = _complete(served, steering={"behavior": "fresh", "multiplier": 1.5})
    want = reference(
        prompt + tokens,
        len(prompt),
        {"caa_behavior": "fresh", "caa_layer": 2, "caa_multiplier": 1.5, "vector": torch.tensor(fresh)},
    )
    assert max(abs(a - b) for a, b in zip(logprobs, want, strict=True)) < TOLERANCE
    refusals = [
        (b"{not json", 400, "body"),
        ({"behavior": "fresh", "layer": 2, "vector": fresh}, 409, "behavior"),
        ({"behavior": "short", "layer": 2, "vector": fresh[:10]}, 400, "vector"),
        (
            {"model": {"weights_hash": "dir:0"}, "behavior": "x", "layer": 2, "vector": fresh},
            400,
            "model.weights_hash",
        ),
        ({"vectors": [{"behavior": f"v{i}", "layer": 1, "vector": fresh} for i in range(2)]}, 413, "vectors"),
    ]
    for body, code, field in refusals:
        status, answer = _http(served, "POST", body)
        assert status == code and answer["error"]["param"] == field, answer
    assert len(_http(served, "GET")[1]["vectors"]) == 9


def test_sigterm_stops_the_server_and_every_engine_process(served: Served) -> None:
    """Last in this file: it ends the module's server."""
    family = _descendants(served.proc.pid)
    assert len(family) >= 3, family  # vLLM's API server, its engine core and more
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 143
    time.sleep(1)
    alive = [pid for pid in family if Path(f"/proc/{pid}").exists()]
    assert not alive, alive
    assert "terminated by SIGTERM" in served.err.read_text()


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        here = todo.pop()
        for task in Path(f"/proc/{here}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            todo += map(int, children)
            found += map(int, children)
    return found


def test_a_model_caa_cannot_steer_stops_the_command_in_one_line(tmp_path: Path) -> None:
    """GPT-2's blocks in vLLM return one tensor, not (hidden, residual): refused at start-up."""
    import transformers as tf

    from tests.helpers import make_vectors

    tokenizer = make_tokenizer()
    config = tf.GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=128,
                           bos_token_id=2, eos_token_id=3)  # fmt: skip
    model = tf.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    os.environ.setdefault("CAA_CACHE", str(tmp_path / "caa-cache"))
    vectors = make_vectors(tmp_path / "gpt2", tmp_path)[1]
    args = [str(vectors), "-m", str(tmp_path / "gpt2"), "--port", str(free_port()), "--vllm-python",
            sys.executable, "--", "--enforce-eager", "--max-model-len", "64"]  # fmt: skip
    proc, _, err = _caa_serve(tmp_path, args)
    try:
        assert proc.wait(START_TIMEOUT) == 2
    finally:
        stop(proc)
    last = [x for x in err.read_text().splitlines() if x.strip()][-1]
    assert last.startswith("error: vLLM stopped during start-up (exit code 1): caa serve: GPT2LMHeadModel")
    assert "cannot be steered yet; models of the Llama family" in last
