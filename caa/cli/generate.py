"""`caa generate`: steered text side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from caa import api
from caa.api import MIN_TEMPERATURE, CaaError
from caa.cli import render
from caa.cli.common import (
    DeviceMapOpt,
    DtypeOpt,
    ForceOpt,
    ModelOpt,
    RemoteOpt,
    ScaleOpt,
    SteerOpt,
    TemplateOpt,
    _accelerator,
    _check_outputs,
    _device,
    _load,
    _model_input,
    _provenance,
    app,
    err,
    escape,
    fail,
    out,
    stage_options,
    warn,
)
from caa.cli.parse import parse_multipliers


@app.command()
def generate(
    ctx: typer.Context,
    vectors: Annotated[
        Path, typer.Option("--vectors", "-v", help="vectors.parquet from `caa compute-vectors`.")
    ],
    layer: Annotated[int, typer.Option(help="Layer to steer (output of decoder block l, 0-based).")],
    behavior: Annotated[
        str | None, typer.Option(help="Behavior (needed when the file holds several).")
    ] = None,
    multipliers: Annotated[str, typer.Option(help="Comma-separated, one column each.")] = "-1,0,1",
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts", help='Prompts: .txt (one per line), .jsonl ({"prompt"}) or .parquet (prompt column).'
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use at most this many prompts from --prompts.")] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output file.")] = Path("generations.parquet"),
    model: ModelOpt = "smollm2-135m",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per completion.")] = 48,
    temperature: Annotated[
        float, typer.Option(help=f"0: greedy; from {MIN_TEMPERATURE} up: sampling at that temperature.")
    ] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling (with --temperature).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    steer_positions: SteerOpt = "answer",
    scale: ScaleOpt = "raw",
    chat_template: TemplateOpt = "auto",
    batch_size: Annotated[
        int, typer.Option(help="Prompts per batch (each under every multiplier), shortest first.")
    ] = 32,
    force: ForceOpt = False,
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Generate with steering, every prompt under every multiplier, side by side.

    Under `accelerate launch -m caa generate ...` the batches of prompts are shared out over the
    processes and the main process writes every row, the rows one process writes.

    Example: [bold]caa generate -v vectors.parquet --behavior sentiment --layer 14 --multipliers -4,0,4
    -p "Describe your morning."[/]
    """
    accelerator = _accelerator()  # under a launcher of several processes, the batches are shared out
    main = accelerator.is_main_process
    outputs = [(out_path, api.OUTPUTS["generations"])]
    _check_outputs([vectors, prompts_file, _model_input(model)], outputs, force, main)
    try:
        options = stage_options(api.GenerateOptions, ctx, multipliers=parse_multipliers(multipliers))
        plan = api.plan_generate(vectors, model, options, prompt or [], prompts_file, limit)
        for line in plan.warnings if main else []:
            warn(line)
        loaded = _load(
            model, dtype, device_map, trust_remote_code, _device(accelerator, device_map), chat_template
        )
        count = len(options.multipliers)
        with err.status(f"generating {len(plan.prompts)} prompts x {count} multipliers"):
            gens = api.generate(
                loaded,
                plan.vectors,
                plan.prompts,
                options,
                labels=plan.labels,
                provenance=_provenance(ctx),
                inputs={"vectors": vectors, **({"prompts": prompts_file} if prompts_file else {})},
                accelerator=accelerator,
                notice=warn if main else None,
            )
        if main:
            gens.save(out_path)
    except CaaError as e:
        fail(e)
    if main:
        render.generations(gens, layer, scale, list(options.multipliers))
        out.print(f"wrote {escape(str(out_path))}")
