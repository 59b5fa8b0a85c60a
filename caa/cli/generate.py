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
    _progress,
    _provenance,
    app,
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
    score: Annotated[
        str | None,
        typer.Option(
            "--score",
            metavar="probe",
            help="probe: score each text by the vector as a detector: the UNSTEERED model reads prompt + "
            "text, and its residual stream at --layer (output of block l), at the generated tokens only "
            "(not the prompt; end-of-sequence excluded), is projected on the unit vector v/|v| and "
            "averaged (column probe_score; per multiplier, the mean and its 95% interval).",
        ),
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option(
            "--judge",
            metavar="URL",
            help="An OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1): POST URL/chat/completions "
            "rates each text 1-10 for the behavior (column judge_rating, null if the reply has no rating).",
        ),
    ] = None,
    judge_model: Annotated[
        str | None, typer.Option("--judge-model", metavar="NAME", help="The judge's model (with --judge).")
    ] = None,
    judge_key_env: Annotated[
        str,
        typer.Option(
            "--judge-key-env",
            metavar="VAR",
            help="The NAME of the environment variable holding the judge's API key (sent as a Bearer "
            "token; unset: no key). Never the key itself.",
        ),
    ] = "OPENAI_API_KEY",
    judge_workers: Annotated[int, typer.Option(help="Judge requests at a time.")] = 4,
    judge_retries: Annotated[
        int,
        typer.Option(
            help="Retries of a judge request after a connection error, a timeout, 429 or 5xx "
            "(waiting 0.5 s, 1 s, 2 s, ...)."
        ),
    ] = 4,
    judge_timeout: Annotated[float, typer.Option(help="Seconds to wait for each judge answer.")] = 60.0,
    force: ForceOpt = False,
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Generate with steering, every prompt under every multiplier, side by side; optionally score
    each text (--score probe, --judge).

    Under `accelerate launch -m caa generate ...` the batches of prompts are shared out over the
    processes and the main process writes every row, the rows one process writes (and asks the judge).

    Example: [bold]caa generate -v vectors.parquet --behavior sentiment --layer 14 --multipliers -4,0,4
    -p "Describe your morning." --score probe[/]
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
        rows = len(plan.prompts) * len(options.multipliers)
        with _progress(disable=not main) as bar:  # type: ignore[attr-defined]
            made = bar.add_task(f"generating ({len(options.multipliers)} multipliers)", total=rows, rate="")
            rated = bar.add_task("judging", total=rows, rate="", visible=bool(options.judge))
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
                on_rows=lambda n: bar.advance(made, n),
                on_judged=lambda n: bar.advance(rated, n),
            )
        if main:
            gens.save(out_path)
    except api.JudgeError as e:
        if main and e.partial is not None:
            e.partial.save(out_path)
            fail(CaaError(f"{e}; wrote {out_path} without ratings"))
        fail(e)
    except CaaError as e:
        fail(e)
    if main:
        render.generations(gens, layer, scale, list(options.multipliers))
        render.text_scores(gens)
        out.print(f"wrote {escape(str(out_path))}")
