"""The vLLM plugin: per-request steering on stock vLLM (V1 model runner), eager or compiled.

vLLM loads :func:`register` in every one of its processes (the ``vllm.general_plugins`` entry point);
it does nothing unless ``CAA_SERVE_VECTORS`` names a caa ``vectors.parquet``. Then:

- front end (the API server): a request's ``caa_*`` keys in ``vllm_xargs`` are checked at admission
  (:meth:`VectorBank.parse`; a wrong one is an HTTP 400 naming the key, the engine never sees it),
  and its prefix-cache salt gets the steering spec, so differently steered requests never share
  KV blocks;
- compile cache: off (``VLLM_DISABLE_COMPILE_CACHE=1``), since vLLM's key for a saved graph does
  not see the wrapped blocks;
- worker: after the model loads, each decoder block that has a vector is wrapped by
  :class:`SteeredLayer`, which adds ``scale[:n, None] * bank[rows[:n]]`` to the residual stream it
  returns; before each forward pass, outside the compiled region, the runner's batch (request order,
  ``query_start_loc``, positions, prompt lengths) fills those tables (:class:`Tables`). The graph that
  torch.compile traces reads the tables as inputs, so steering is never traced away.

vLLM is imported inside the functions only: caa itself never needs it.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from caa.errors import CaaError
from caa.models.loading import directory_hash
from caa.serve.steering import PREFIX, NewVector, SteeringRequestError, Tables, VectorBank, flat_keys
from caa.stages.checks import check_fits

ENV = "CAA_SERVE_VECTORS"
MAX_VECTORS = "CAA_SERVE_MAX_VECTORS"  # how many vectors the bank holds, those added while serving included
LAYERS = "CAA_SERVE_LAYERS"  # the blocks steerable besides the file's (comma-separated), for added vectors
TRACE = "CAA_SERVE_TRACE"  # a file: each forward pass's batch, one line (for tests and debugging)
_dtype: list[torch.dtype] = [torch.float32]  # the served model's dtype, as the front end learns it


class SteeredLayer(nn.Module):
    """A decoder block that returns ``(hidden, residual)`` (vLLM's Llama family), with this slot's
    steering added to the residual: their sum, the residual stream after the block, moves by
    ``multiplier * vector`` at the steered tokens and by nothing elsewhere."""

    bank: torch.Tensor
    rows: torch.Tensor
    scale: torch.Tensor

    def __init__(self, layer: nn.Module, tables: Tables, slot: int):
        super().__init__()
        self.layer = layer
        self.register_buffer("bank", tables.bank, persistent=False)
        self.register_buffer("rows", tables.rows, persistent=False)
        self.register_buffer("scale", tables.scale[slot], persistent=False)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: Any, **kwargs: Any
    ) -> Any:
        hidden, residual = self.layer(positions, hidden_states, residual, **kwargs)
        n = hidden.shape[0]
        return hidden, residual + self.scale[:n, None] * self.bank[self.rows[:n]]


@functools.cache
def _bank() -> VectorBank:
    return VectorBank.read(os.environ[ENV], int(os.environ.get(MAX_VECTORS) or 0))


def steerable_layers() -> list[int]:
    """The blocks this server steers: the vectors file's, and those ``CAA_SERVE_LAYERS`` adds."""
    extra = [int(x) for x in os.environ.get(LAYERS, "").split(",") if x.strip()]
    return sorted(set(_bank().layers()) | set(extra))


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, each of which must return ``(hidden, residual)``."""
    family = "models of the Llama family (llama, mistral, qwen2, SmolLM2) can"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise CaaError(
            f"caa serve: {type(model).__name__} has no model.layers of decoder blocks, so it cannot be "
            f"steered yet; {family}"
        )
    params = inspect.signature(layers[0].forward).parameters
    if "residual" not in params:
        raise CaaError(
            f"caa serve: {type(layers[0]).__name__} does not return (hidden, residual), so it cannot be "
            f"steered yet; {family}"
        )
    return layers


def check_model(bank: VectorBank, model_path: str, hidden: int, num_layers: int) -> None:
    """Refuse vectors made with another model (caa.stages.checks.check_fits, on what the engine knows
    without loading the model again): width, layers, and, for a model directory, the weights hash
    the vectors recorded."""
    made = str((bank.model or {}).get("weights_hash") or "")
    directory = Path(model_path)
    directory_made = made.startswith("dir:") and directory.is_dir()
    known = {"weights_hash": directory_hash(directory)} if directory_made else {}
    check_fits(
        bank.path,
        bank.model,
        bank.width,
        bank.layers(),
        f"the served model {directory}",
        known,
        hidden=hidden,
        num_layers=num_layers,
        strict=False,
    )


def install(runner: Any) -> Tables:
    """Wrap the steered decoder blocks of ``runner.model`` and give the runner its tables."""
    bank = _bank()
    model = runner.model
    layers = _decoder_layers(model)
    config = runner.model_config
    check_model(bank, str(config.model), int(config.get_hidden_size()), len(layers))
    device = next(model.parameters()).device
    layers_wanted = steerable_layers()
    bad = [layer for layer in layers_wanted if not 0 <= layer < len(layers)]
    if bad:
        raise CaaError(f"{LAYERS}: layer {bad[0]} is out of range; the model has {len(layers)} blocks")
    tables = Tables(bank, int(runner.max_num_tokens), runner.model_config.dtype, device, layers_wanted)
    for layer in tables.layers:
        layers[layer] = SteeredLayer(layers[layer], tables, tables.slot[layer])
    runner._caa_tables = tables
    from vllm.logger import init_logger

    init_logger("caa.serve").info(
        "caa: steering layers %s with %d vectors from %s", tables.layers, len(bank.keys), bank.path
    )
    return tables


def fill(runner: Any, positions: torch.Tensor | None) -> None:
    """Fill the runner's tables from its input batch (called just before the model's forward)."""
    tables: Tables | None = getattr(runner, "_caa_tables", None)
    if tables is None or positions is None:
        return
    batch = runner.input_batch
    n = batch.num_reqs
    ids = batch.req_ids[:n]
    query_start = runner.query_start_loc.cpu[: n + 1].tolist()
    dtype = runner.model_config.dtype
    steers, lengths = [], []
    for req_id in ids:
        state = runner.requests[req_id]
        if not hasattr(state, "caa_steer"):  # parsed once per request (checked at admission already)
            params = state.sampling_params
            state.caa_steer = _bank().parse(params.extra_args if params is not None else None, dtype)
        steers.append(state.caa_steer)
        lengths.append(int(state.num_prompt_tokens))
    tables.fill(steers, lengths, query_start, positions)
    trace = os.environ.get(TRACE)
    if trace:  # one line per forward pass: requests, distinct steerings (unsteered counts), steered tokens
        kinds = {None if x is None else x.salt() for x in steers}
        with open(trace, "a") as f:
            f.write(f"{len(steers)} {len(kinds)} {tables.steered_tokens}\n")


def add_vectors(worker: Any, payload: list[tuple[str, int, list[float], float | None]]) -> list[int]:
    """The worker's side of ``POST /v1/steering/vectors`` (a ``collective_rpc`` method): put checked
    vectors into this process's bank and into the steering tables, in the rows the bank gives them."""
    new = [NewVector(b, int(layer), np.asarray(v, dtype=np.float32), r) for b, layer, v, r in payload]
    rows = _bank().add(new)
    tables: Tables = worker.model_runner._caa_tables
    tables.put(rows, np.stack([v.values for v in new]))
    return rows


def _patch_worker() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    setattr(WorkerBase, "caa_add_vectors", add_vectors)  # noqa: B010

    classes: list[type] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except ImportError:  # a GPU build without the CPU runner
        pass
    for cls in classes:
        load = cls.__dict__.get("load_model")
        if load is not None and not getattr(load, "_caa", False):
            setattr(cls, "load_model", _after_load(load))  # noqa: B010
    forward = GPUModelRunner._model_forward
    if not getattr(forward, "_caa", False):

        @functools.wraps(forward)
        def model_forward(
            self: Any, input_ids: Any = None, positions: Any = None, *args: Any, **kwargs: Any
        ) -> Any:
            fill(self, positions)
            return forward(self, input_ids, positions, *args, **kwargs)

        model_forward._caa = True  # type: ignore[attr-defined]
        setattr(GPUModelRunner, "_model_forward", model_forward)  # noqa: B010


def _after_load(load: Any) -> Any:
    @functools.wraps(load)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load(self, *args, **kwargs)
        if getattr(self, "_caa_tables", None) is None:
            install(self)
        return result

    load_model._caa = True  # type: ignore[attr-defined]
    return load_model


def request_keys(extra: dict[str, Any] | None, nested: Any) -> tuple[dict[str, Any], str]:
    """A request's flat keys (``vllm_xargs``) with its nested ``steering`` object merged in, and the
    prefix its errors name fields with."""
    extra = dict(extra or {})
    if nested is None:
        return extra, "vllm_xargs.caa_"
    if any(isinstance(k, str) and k.startswith(PREFIX) for k in extra):
        raise SteeringRequestError("steering", "give the steering either nested or as vllm_xargs caa_* keys")
    extra.update(flat_keys(nested))
    return extra, "steering."


def _patch_requests() -> None:
    """Nested ``"steering": {...}`` in a chat or completion request (an extra field to vLLM) becomes
    the flat ``caa_*`` keys of its sampling parameters, checked here, before any response starts (a
    streamed request gets its 400 too)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError

    for cls in (ChatCompletionRequest, CompletionRequest):
        original = cls.to_sampling_params
        if getattr(original, "_caa", False):
            continue

        def to_sampling_params(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            params = _original(self, *args, **kwargs)
            try:
                extra, field = request_keys(params.extra_args, (self.model_extra or {}).get("steering"))
                _bank().parse(extra, _dtype[0], field)
            except SteeringRequestError as e:
                raise VLLMValidationError(str(e), parameter=e.field) from None
            params.extra_args = extra or None
            return params

        to_sampling_params._caa = True  # type: ignore[attr-defined]
        setattr(cls, "to_sampling_params", to_sampling_params)  # noqa: B010


def _patch_front_end() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    process = InputProcessor.process_inputs
    if getattr(process, "_caa", False):
        return
    init = InputProcessor.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _dtype[0] = self.model_config.dtype  # for the checks made before a request reaches it

    setattr(InputProcessor, "__init__", __init__)  # noqa: B010

    @functools.wraps(process)
    def process_inputs(
        self: Any, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any
    ) -> Any:
        steer = None
        extra = getattr(params, "extra_args", None)
        if extra:
            try:
                steer = _bank().parse(extra, self.model_config.dtype)
            except SteeringRequestError as e:
                raise VLLMValidationError(str(e), parameter=e.field) from None
        request = process(self, request_id, prompt, params, *args, **kwargs)
        if steer is not None:
            request.cache_salt = f"{request.cache_salt or ''}|{steer.salt()}"
        return request

    process_inputs._caa = True  # type: ignore[attr-defined]
    setattr(InputProcessor, "process_inputs", process_inputs)  # noqa: B010


def register() -> None:
    """The ``vllm.general_plugins`` entry point: patch this process's vLLM when ``CAA_SERVE_VECTORS``
    is set (the bank is read once per process, at the first request or model load)."""
    if not os.environ.get(ENV):
        return
    # vLLM keys its saved compiled graphs by its config and the model's source, not by the blocks we
    # wrap: a graph saved by a server with other vectors (other layers), or none, would be loaded as is.
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    _bank()  # a vectors file that cannot be read stops the server here, in every process
    _patch_requests()
    _patch_front_end()
    _patch_worker()
