"""`caa serve`: the steered model behind vLLM's OpenAI-compatible API, steering chosen per request."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from caa import api
from caa.api import CaaError
from caa.cli import render
from caa.cli.common import ModelOpt, app, err, escape, fail
from caa.cli.parse import parse_layers


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def serve(
    ctx: typer.Context,
    vectors: Annotated[Path, typer.Argument(help="vectors.parquet from `caa compute-vectors` (or import).")],
    model: ModelOpt = "smollm2-135m",
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require this key (Authorization: Bearer ...) on every /v1 route.", envvar="CAA_API_KEY"
        ),
    ] = None,
    max_vectors: Annotated[
        int, typer.Option(help="Vectors the server holds at most, those added by POST included.")
    ] = 256,
    steerable_layers: Annotated[
        str | None,
        typer.Option(help="Layers POSTed vectors may steer besides the file's: e.g. 8,12 or 4-20 or all."),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model name clients send (default: the alias or directory name).")
    ] = None,
    vllm_python: Annotated[
        str | None,
        typer.Option(
            help="The Python that has vLLM (default: $CAA_VLLM_PYTHON, else this one).", show_default=False
        ),
    ] = None,
) -> None:
    """Serve the model on vLLM's OpenAI-compatible server, each request steered as it asks.

    Per request: extra_body={"steering": {"behavior": "sentiment", "layer": 18, "multiplier": 2.0}},
    with optional "positions" (answer, prompt-end, all) and "scale" (raw, residual), which mean what
    `caa generate --steer-positions/--scale` mean; or vLLM's flat vllm_xargs (caa_behavior, caa_layer,
    caa_multiplier, caa_positions, caa_scale). A request without them is the unsteered model. Layer l is
    the output of decoder block l (0-based). GET/POST /v1/steering/vectors lists and adds vectors.
    Options after -- go to vLLM unchanged. Ctrl-C or SIGTERM stops the server and every engine process
    it started. vLLM must be installed for the Python that runs it: `make install-serve` builds .venv-
    serve.

    Example: [bold].venv-serve/bin/caa serve demo-out/vectors.parquet --port 8001 --
    --max-model-len 4096[/]
    """
    try:
        layers = parse_layers(steerable_layers, "--steerable-layers") if steerable_layers else ()
        options = api.ServeOptions(
            host=host,
            port=port,
            api_key=api_key,
            max_vectors=max_vectors,
            steerable_layers="all" if steerable_layers and layers is None else tuple(layers or ()),
            served_model_name=served_model_name,
            vllm_python=vllm_python,
            vllm_args=tuple(ctx.args),
        )
        with err.status(f"checking {escape(str(vectors))} and {escape(model)}"):
            plan = api.plan_serve(vectors, model, options, progress=lambda m: err.print(escape(m)))
        err.print(f"starting vLLM on {escape(plan.url)} (its log follows)")
        code = api.run_serve(plan, on_ready=render.serving, on_output=_passthrough)
    except CaaError as e:
        fail(e)
    except KeyboardInterrupt:
        err.print("stopped: the server and its engine processes have exited")
        raise typer.Exit(130) from None
    if code:
        err.print(f"[bold red]error:[/] vLLM exited with code {code}")
        raise typer.Exit(2)


def _passthrough(line: str) -> None:
    err.out(line, highlight=False)  # vLLM's log as it is: no markup read into it
