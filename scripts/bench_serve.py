"""Serving: caa's vLLM plugin under load. Stock vLLM's OpenAI-compatible server
(``python -m vllm.entrypoints.openai.api_server``, its own environment: ``.venv-serve``, made by
``make .venv-serve/.caa-installed``; ``CAA_SERVE_PYTHON`` names another interpreter) on the embedded
SmolLM2 (its converted safetensors directory in caa's model cache), float32, compiled (vLLM's
default), with ``CAA_SERVE_VECTORS`` naming 16 vectors made here by caa's own pipeline (2 behaviors x
8 layers).

- Load: 64 concurrent streamed completions of exactly 64 new tokens (``min_tokens``,
  ``ignore_eos``), greedy, the same 64 templated prompts sent as token ids. Arms, interleaved in
  rounds (the best of each): the plugin's server unsteered; the same server steered, request ``i``
  taking vector ``i % 16`` (so every batch mixes 16 distinct vectors at 8 layers); and a second
  server without the plugin loaded (``CAA_SERVE_VECTORS`` unset). Output tokens/s (all tokens over
  the wall time from the first request sent to the last token), TTFT (request sent to first token)
  and TPOT ((last token - first token) / 63) p50/p95.
- Engine against ``caa generate``: 32 of the prompts under multipliers -2 and 2 (one vector), 64
  tokens each: the server (64 requests at once) against ``caa.generate`` in this process (the
  library call the CLI makes, batch 32 prompts = 64 rows; model load excluded on both sides).

Both servers are up together, each in its own process group (stopped with the section, and on
SIGTERM); an idle server takes no CPU, and the arms run one at a time. ``--quick``: 16 requests of
16 tokens (still every vector in every batch), one round.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import DATA, EMBEDDED, ROOT, Bench, Section, spread_layers

import caa
from caa.core.prompts import prompt_format
from caa.models.cache import converted
from caa.stages.ingest import PairSet

CONCURRENCY = 64  # requests at once (16 under --quick: still one per vector)
NEW_TOKENS = 64  # per request (16 under --quick)
START_TIMEOUT = 600.0  # seconds for an engine to come up (two compile at once; minutes on a loaded machine)
SERVED = "smollm2-135m"
# Published anchors (issue 23), not measured here.
ANCHORS = [
    "anchor (published, not measured here): EasySteer's own table shows steered throughput at 0.76x "
    "unsteered",
    "anchor (published, not measured here): a vLLM steering fork reports +7.8% end-to-end latency with "
    "16 distinct vectors",
]


def serve_python() -> Path:
    """The interpreter of the serving environment (vLLM next to caa)."""
    given = os.environ.get("CAA_SERVE_PYTHON")
    path = Path(given) if given else ROOT / ".venv-serve" / "bin" / "python"
    if not path.is_file():
        raise RuntimeError(
            f"no vLLM environment at {path}: run `make .venv-serve/.caa-installed` (or set CAA_SERVE_PYTHON)"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    began: float
    startup_s: float = 0.0

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def start(name: str, model: Path, vectors: Path | None, workdir: Path, concurrency: int) -> Server:
    """A vLLM server on ``model`` in a process group of its own; the plugin loaded iff ``vectors``."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # this tree's caa (the plugin's entry point imports it by name)
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CACHE_ROOT": str(workdir / f"vllm-cache-{name}"),  # a fresh compile cache per server
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("CAA_SERVE_VECTORS", None)
    env.pop("CAA_SERVE_TRACE", None)
    if vectors is not None:
        env["CAA_SERVE_VECTORS"] = str(vectors)
    command = [
        str(serve_python()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", SERVED, "--dtype", "float32",
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
        "--max-num-seqs", str(concurrency), "--seed", "0", "--disable-log-stats",
    ]  # fmt: skip
    log = workdir / f"server-{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(name, proc, port, log, time.monotonic())


def wait_up(server: Server) -> None:
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vLLM ({server.name}) exited with {server.proc.returncode}:\n{server.tail()}")
        if time.monotonic() - server.began > START_TIMEOUT:
            raise RuntimeError(f"vLLM ({server.name}) not up after {START_TIMEOUT:.0f} s:\n{server.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v1/models", timeout=2):
                server.startup_s = time.monotonic() - server.began
                return
        except OSError:
            time.sleep(1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a server and every engine process it started (its own process group), waiting until the
    whole group is gone: it outlives its leader while an engine process exits."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive(proc):
                return
            time.sleep(0.5)


_LIVE: list[subprocess.Popen[bytes]] = []  # the servers now up


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM: end the servers now (their streams then end, so the client threads return), then
    unwind through run's cleanup."""
    for proc in _LIVE:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit(128 + signum)


def group_alive(proc: subprocess.Popen[bytes]) -> bool:
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Stream:
    sent: float
    first: float
    last: float
    tokens: int


def complete(
    port: int, ids: Sequence[int], xargs: dict[str, Any] | None, new_tokens: int, salt: str
) -> Stream:
    """One streamed greedy completion of exactly ``new_tokens`` tokens (raw HTTP, server-sent events);
    ``salt``: its prefix-cache salt."""
    body: dict[str, Any] = {
        "model": SERVED,
        "cache_salt": salt,
        "prompt": list(ids),
        "max_tokens": new_tokens,
        "min_tokens": new_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if xargs:
        body["vllm_xargs"] = xargs
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    first = last = 0.0
    tokens = 0
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                now = time.perf_counter()
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    finally:
        conn.close()
    return Stream(sent, first, last, tokens)


_RUNS = itertools.count()


def load(
    port: int, prompts: Sequence[Sequence[int]], xargs: Sequence[dict[str, Any] | None], new_tokens: int
) -> dict[str, Any]:
    """Every request at once (one thread each): tokens/s, and TTFT / TPOT in ms per request. Each
    call salts the prefix cache afresh: no run reads the prompts an earlier one (the warm-up) cached."""
    gate = threading.Barrier(len(prompts))
    salt = f"caa-bench-{next(_RUNS)}"

    def one(k: int) -> Stream:
        gate.wait()
        return complete(port, prompts[k], xargs[k], new_tokens, salt)

    with ThreadPoolExecutor(len(prompts)) as pool:
        streams = list(pool.map(one, range(len(prompts))))
    short = [s.tokens for s in streams if s.tokens != new_tokens]
    if short:
        raise RuntimeError(f"{len(short)} requests made {short[:3]} tokens, not {new_tokens}")
    wall = max(s.last for s in streams) - min(s.sent for s in streams)
    return {
        "tokens_per_s": sum(s.tokens for s in streams) / wall,
        "wall_s": wall,
        "ttft_ms": [1e3 * (s.first - s.sent) for s in streams],
        "tpot_ms": [1e3 * (s.last - s.first) / (s.tokens - 1) for s in streams],
    }


def make_vectors(bench: Bench, work: Path) -> tuple[Path, list[tuple[str, int]]]:
    """vectors.parquet of 2 behaviors x 8 layers by caa's pipeline (16 training pairs per behavior)."""
    pairs = caa.ingest([DATA / "sentiment.jsonl", DATA / "sycophancy.json"])
    path = pairs.save(work / "pairs.parquet")
    train = pairs.select("train").frame
    train = train.groupby("behavior", sort=True).head(16)
    layers = spread_layers(bench.loaded.num_layers, 8)
    acts = caa.extract(
        bench.loaded, PairSet(train, pairs.meta, path), caa.ExtractOptions(layers=tuple(layers))
    )
    vectors = caa.compute_vectors(acts)
    out = vectors.save(work / "vectors.parquet")
    keys = sorted(
        {(str(b), int(layer)) for b, layer in zip(vectors.frame.behavior, vectors.frame.layer, strict=True)}
    )
    if len(keys) != 16:
        raise RuntimeError(f"expected 16 (behavior, layer) vectors, made {len(keys)}")
    return out, keys


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q))


def run(bench: Bench) -> Section:
    if bench.shape != "smollm2" or bench.cuda:
        raise RuntimeError("the serve section runs the embedded SmolLM2 on the CPU (vllm-cpu)")
    new_tokens, concurrency = bench.pick(16, NEW_TOKENS), bench.pick(16, CONCURRENCY)
    work = bench.workdir / "serve"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = converted(EMBEDDED)  # made when the bench loaded the embedded model
    if model_dir is None:
        raise RuntimeError(f"no converted {EMBEDDED} in caa's model cache")
    python = serve_python()
    vectors, keys = make_vectors(bench, work)
    behaviors, layers = sorted({b for b, _ in keys}), sorted({n for _, n in keys})
    bench.log(f"serve: vectors made ({behaviors} x layers {layers}); starting two vLLM servers ({python})")

    tok = bench.loaded.tokenizer
    style = prompt_format(tok)
    lines = (DATA / "neutral_prompts.txt").read_text().splitlines()
    texts = [lines[i % len(lines)] for i in range(concurrency)]
    ids = [tok(style.prefix(tok, p), add_special_tokens=not style.chat)["input_ids"] for p in texts]
    multipliers = (-2.0, 2.0)
    steers = [
        {
            "caa_behavior": keys[i % 16][0],
            "caa_layer": keys[i % 16][1],
            "caa_multiplier": multipliers[i // 16 % 2],
        }
        for i in range(concurrency)
    ]

    # a SIGTERM (a time limit) unwinds through the finally below, so the servers never outlive us
    previous = signal.signal(signal.SIGTERM, _terminated)
    servers = [
        start("plugin", model_dir, vectors, work, concurrency),
        start("no-plugin", model_dir, None, work, concurrency),
    ]
    _LIVE[:] = [s.proc for s in servers]
    try:
        for s in servers:
            wait_up(s)
        plugin, bare = servers
        bench.log(f"serve: up in {plugin.startup_s:.0f} s (plugin) and {bare.startup_s:.0f} s (no plugin)")
        arms = {
            "no-plugin": (bare.port, [None] * concurrency),
            "unsteered": (plugin.port, [None] * concurrency),
            "steered": (plugin.port, steers),
        }
        for port, xargs in arms.values():  # warm-up: every batch size the engine compiles for
            load(port, ids, xargs, 8)
        rounds = bench.pick(1, 3)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
        for r in range(rounds):
            for name, (port, xargs) in arms.items():
                results[name].append(load(port, ids, xargs, new_tokens))
                bench.log(f"serve: round {r + 1} {name}: {results[name][-1]['tokens_per_s']:.1f} tokens/s")
        best = {name: max(runs, key=lambda x: x["tokens_per_s"]) for name, runs in results.items()}

        # the engine against caa generate: 32 prompts x multipliers -2, 2 of one vector
        behavior, layer = keys[len(keys) // 2]
        half = concurrency // 2
        pair_ids = [ids[k] for k in range(half) for _ in multipliers]
        pair_xargs = [
            {"caa_behavior": behavior, "caa_layer": layer, "caa_multiplier": m}
            for _ in range(half)
            for m in multipliers
        ]
        served = load(plugin.port, pair_ids, pair_xargs, new_tokens)
        bench.log(f"serve: engine, {half} prompts x 2 multipliers: {served['tokens_per_s']:.1f} tokens/s")
    finally:
        for s in servers:
            stop(s.proc)
        signal.signal(signal.SIGTERM, previous)
        _LIVE.clear()
        left = [s.name for s in servers if group_alive(s.proc)]
        if left:
            raise RuntimeError(f"vLLM processes left running: {', '.join(left)}")

    vset = caa.VectorSet.read(vectors)
    options = caa.GenerateOptions(
        layer=layer, behavior=behavior, multipliers=multipliers, max_new_tokens=new_tokens, batch_size=half
    )
    began = time.perf_counter()
    gens = caa.generate(bench.loaded, vset, texts[:half], options)
    generate_s = time.perf_counter() - began
    # HF's generate steps every row until all have ended: positions computed = rows x the longest
    longest = int(gens.frame["n_tokens"].max())
    steps = new_tokens if longest >= new_tokens else longest + 1
    generated = len(gens.frame) * steps / generate_s
    bench.log(f"serve: caa generate, the same {concurrency} rows: {generated:.1f} tokens/s ({steps} steps)")

    section = Section(
        "serve",
        f"stock vLLM 0.32 (vllm-cpu) OpenAI server on {EMBEDDED} (float32, compiled, --max-num-seqs "
        f"{concurrency}), {concurrency} concurrent streamed requests x {new_tokens} new tokens (ignore_eos), "
        f"greedy; steered: request i takes vector i % 16 of 16 (2 behaviors x 8 layers, multipliers "
        f"-2/2); best of {rounds} interleaved rounds (no plugin, plugin unsteered, plugin steered): "
        + "; ".join(f"{n} " + " / ".join(f"{x['tokens_per_s']:.0f}" for x in rs) for n, rs in results.items())
        + " tokens/s; engine up in "
        f"{plugin.startup_s:.0f} s (plugin) / {bare.startup_s:.0f} s (no plugin), both starting at once",
    )
    base, plain, steered = best["no-plugin"], best["unsteered"], best["steered"]
    section.add("no plugin: output", base["tokens_per_s"], "tokens/s")
    section.add(
        "plugin, unsteered: output", plain["tokens_per_s"], "tokens/s", "no plugin",
        plain["tokens_per_s"] / base["tokens_per_s"],
    )  # fmt: skip
    section.add(
        "plugin, 16 vectors mixed: output", steered["tokens_per_s"], "tokens/s", "plugin, unsteered",
        steered["tokens_per_s"] / plain["tokens_per_s"], True,
    )  # fmt: skip
    section.add(
        "plugin, 16 vectors mixed: output", steered["tokens_per_s"], "tokens/s", "no plugin",
        steered["tokens_per_s"] / base["tokens_per_s"],
    )  # fmt: skip
    named = (("no plugin", base), ("plugin, unsteered", plain), ("plugin, 16 vectors mixed", steered))
    for label, arm in named:
        for metric in ("ttft", "tpot"):
            for q in (50, 95):
                section.add(f"{label}: {metric.upper()} p{q}", pct(arm[f"{metric}_ms"], q), "ms")
    section.add(f"caa generate (transformers), {half} prompts x 2 multipliers", generated, "tokens/s")
    section.add(
        f"vLLM + plugin, the same {concurrency} rows", served["tokens_per_s"], "tokens/s", "caa generate",
        served["tokens_per_s"] / generated, True,
    )  # fmt: skip
    section.notes += [
        "steered/unsteered latency: TPOT p50 "
        f"{pct(steered['tpot_ms'], 50) / pct(plain['tpot_ms'], 50):.3f}x, "
        f"end-to-end (wall) {steered['wall_s'] / plain['wall_s']:.3f}x",
        f"caa generate: caa.generate in the bench's process (model loaded, batch {half} prompts x 2 "
        f"multipliers = {len(gens.frame)} rows, {steps} steps each), {generate_s:.1f} s; the server's "
        f"side: {served['wall_s']:.1f} s for the same rows from request to last token",
        *ANCHORS,
    ]
    section.series = {
        name: [{k: v for k, v in x.items() if k in ("tokens_per_s", "wall_s")} for x in rs]
        for name, rs in results.items()
    }
    return section
