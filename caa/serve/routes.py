"""``/v1/steering/vectors`` on vLLM's OpenAI-compatible server (a ``vllm.endpoint_plugins`` entry
point, which vLLM loads only when ``VLLM_PLUGINS`` names it: ``caa serve`` does).

- ``GET`` lists the loaded vectors (behavior, layer, norm, the mean residual norm ``scale: residual``
  uses, where each came from), the model fingerprint they were made with, the steerable layers and
  how many vectors the server holds at most.
- ``POST`` adds vectors without a restart: ``{"vectors": [{"behavior", "layer", "vector",
  "mean_residual_norm"?}, ...], "model"?: fingerprint}`` (a vectors file's rows) or one such object.
  They go to the engine's workers first (``collective_rpc``), then to the front end's bank, so no
  request is admitted with a vector a worker lacks.

Both sit under ``/v1``, so vLLM's ``--api-key`` guards them as it guards the completions. A body is
JSON, read with a size limit; nothing in it is executed or unpickled. (No ``from __future__ import
annotations`` here: FastAPI reads the handlers' annotations, and ``Request`` is imported in a function,
since fastapi is vLLM's dependency, not caa's.)
"""

import asyncio
import json
from argparse import Namespace
from typing import Any

from caa.serve.plugin import _bank, steerable_layers
from caa.serve.steering import SteeringRequestError

PATH = "/v1/steering/vectors"
MAX_BODY = 64 << 20  # bytes: 4096 vectors of width 2048 as JSON text fit


def _error(status: int, field: str, message: str) -> Any:
    from fastapi.responses import JSONResponse

    kind = {401: "AuthenticationError", 409: "ConflictError", 413: "RequestTooLarge"}.get(
        status, "BadRequestError"
    )
    body = {"error": {"message": message, "type": kind, "param": field, "code": status}}
    return JSONResponse(body, status_code=status)


def _check_model(body: Any) -> None:
    """A body that names the model its vectors were made with must name the served vectors' model."""
    made = body.get("model") if isinstance(body, dict) else None
    if made is None:
        return
    mine = (_bank().model or {}).get("weights_hash")
    theirs = made.get("weights_hash") if isinstance(made, dict) else None
    if not isinstance(theirs, str):
        raise SteeringRequestError("model.weights_hash", "the model's fingerprint is required")
    if mine is not None and theirs != mine:
        raise SteeringRequestError(
            "model.weights_hash", f"is {theirs!r} but this server's vectors were made with {mine!r}"
        )


class SteeringEndpoints:
    """The endpoint plugin: its routes and the engine client they reach the workers through."""

    name = "caa_endpoints"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine: Any = None
        self.lock = asyncio.Lock()

    def attach_router(self, app: Any) -> None:
        from fastapi import APIRouter, Request

        router = APIRouter()

        @router.get(PATH)
        async def list_vectors() -> dict[str, Any]:
            bank = _bank()
            return {
                "model": bank.model,
                "steerable_layers": steerable_layers(),
                "max_vectors": bank.capacity,
                "vectors": bank.listing(),
            }

        @router.post(PATH)
        async def add_vectors(request: Request) -> Any:
            body = await request.body()
            if len(body) > MAX_BODY:
                return _error(413, "body", f"the body has {len(body)} bytes; at most {MAX_BODY} are read")
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                return _error(400, "body", f"body: not JSON ({e})")
            if isinstance(data, dict):
                data = dict(data)
                try:
                    _check_model(data)
                except SteeringRequestError as e:
                    return _error(e.status, e.field, str(e))
                data.pop("model", None)
            async with self.lock:  # one addition at a time: rows are given in order
                bank = _bank()
                try:
                    new = bank.check_new(data, steerable_layers())
                except SteeringRequestError as e:
                    return _error(e.status, e.field, str(e))
                payload = [(v.behavior, v.layer, v.values.tolist(), v.mean_residual_norm) for v in new]
                await self.engine.collective_rpc("caa_add_vectors", args=(payload,))
                rows = bank.add(new)
            added = [{"behavior": v.behavior, "layer": v.layer} for v in new]
            return {"added": added, "rows": rows, "vectors": len(bank.keys), "max_vectors": bank.capacity}

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self.engine = engine_client
