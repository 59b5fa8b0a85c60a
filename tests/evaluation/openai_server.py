"""A small OpenAI-compatible chat server (FastAPI + uvicorn) for the judge's tests: real HTTP, real
framework, deterministic and scriptable.

``POST /v1/chat/completions`` answers in OpenAI's response shape. The rating it gives is derived
from the answer text in the request (the last ``<<<`` ... ``>>>`` block of the user message, as
:func:`caa.evaluation.judge.rubric` writes it): :func:`expected_rating`. The script (``POST
/control/script``, which also clears the log) makes it misbehave on purpose:

- ``key``: the key expected as ``Authorization: Bearer KEY`` (else 401, as OpenAI answers);
- ``fail_first`` requests answered ``fail_status`` (503 by default; a 429 carries ``Retry-After: 0``);
- ``delay_first`` requests answered after ``delay`` seconds (to make a client time out);
- ``unparseable``: texts which, in the request's prompt block, get a reply without a rating.

``GET /control/log`` returns every request received (arrival time, Authorization header, body), so
a test can count retries and check what was sent. :func:`running_server` starts it in a subprocess on
a free port of 127.0.0.1 (the socket is bound by the parent and handed over, so no other process can
take the port meanwhile), and stops it by its PID.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at
# runtime, and they are imported inside make_app, so that only the server's process imports FastAPI

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
UNPARSEABLE_REPLY = "I would rather not put a number on this answer."


def expected_rating(answer: str) -> int:
    """The rating the server gives an answer: its length in characters, mod 10, plus 1."""
    return len(answer) % 10 + 1


def _block(content: str, occurrence: int) -> str:
    """The text of the ``<<<`` ... ``>>>`` block counted from the end (-1: the last, the answer)."""
    parts = content.split("<<<\n")
    return parts[occurrence].split("\n>>>")[0] if len(parts) > 1 else ""


def make_app() -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    state: dict[str, Any] = {"script": {}, "log": [], "count": 0}

    @app.get("/control/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/control/script")
    async def script(request: Request) -> dict[str, bool]:
        state["script"], state["log"], state["count"] = await request.json(), [], 0
        return {"ok": True}

    @app.get("/control/log")
    async def log() -> list[dict[str, Any]]:
        return list(state["log"])

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        auth = request.headers.get("authorization")
        state["log"].append({"time": time.monotonic(), "authorization": auth, "body": body})
        state["count"] += 1
        number, plan = state["count"], state["script"]
        if number <= plan.get("delay_first", 0):
            await asyncio.sleep(plan.get("delay", 1.0))
        if number <= plan.get("fail_first", 0):
            status = plan.get("fail_status", 503)
            headers = {"Retry-After": "0"} if status == 429 else {}
            return JSONResponse({"error": {"message": "try again later"}}, status, headers=headers)
        if plan.get("key") is not None and auth != f"Bearer {plan['key']}":
            error = {"message": "Incorrect API key provided.", "type": "invalid_request_error"}
            return JSONResponse({"error": error}, 401)
        content = body["messages"][-1]["content"]
        answer, prompt = _block(content, -1), _block(content, -2)
        unparseable = prompt in plan.get("unparseable", [])
        reply = UNPARSEABLE_REPLY if unparseable else str(expected_rating(answer))
        return {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": len(content.split()), "completion_tokens": 1, "total_tokens": 0},
        }

    return app


@dataclass
class Server:
    """A running server: its base URL (``http://127.0.0.1:PORT/v1``) and process."""

    url: str
    process: subprocess.Popen[bytes]

    def script(self, **plan: Any) -> None:
        """Set the misbehaviour (see the module's docstring) and clear the log."""
        _call(self.url.removesuffix("/v1") + "/control/script", plan)

    def log(self) -> list[dict[str, Any]]:
        return list(_call(self.url.removesuffix("/v1") + "/control/log"))


def _call(url: str, payload: Any = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@contextmanager
def running_server(start_timeout: float = 120.0) -> Iterator[Server]:
    """Start the server in a subprocess (its own session) on a free port; stop it by its PID."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.evaluation.openai_server", str(sock.fileno())],
        pass_fds=[sock.fileno()],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    sock.close()  # the child holds it now
    server = Server(f"http://127.0.0.1:{port}/v1", process)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the test server exited with {process.returncode}")
            try:
                _call(f"http://127.0.0.1:{port}/control/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """End the server by its PID (SIGTERM, then SIGKILL after 10 s) and reap it."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def gone(pid: int) -> bool:
    """Whether no process has the id ``pid`` any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


if __name__ == "__main__":
    import uvicorn

    listening = socket.socket(fileno=int(sys.argv[1]))
    config = uvicorn.Config(make_app(), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[listening])
