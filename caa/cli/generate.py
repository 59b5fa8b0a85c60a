"""`caa generate`: steered text side by side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from caa.errors import CaaError
from caa.generate import MIN_TEMPERATURE

if TYPE_CHECKING:
    pass

from caa.cli.common import (
    DeviceMapOpt,
    DtypeOpt,
    ForceOpt,
    ModelOpt,
    RemoteOpt,
    ScaleOpt,
    SteerOpt,
    TemplateOpt,
    _before_load,
    _check_outputs,
    _load,
    _model_file,
    _provenance,
    app,
    err,
    escape,
    fail,
    out,
    warn,
)


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
    force: ForceOpt = False,
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Generate with steering, every prompt under every multiplier in one batch, side by side.

    Example: [bold]caa generate -v vectors.parquet --behavior sentiment --layer 14 --multipliers -4,0,4
    -p "Describe your morning."[/]
    """
    from caa.api import generate as run
    from caa.artifacts import GENERATIONS
    from caa.generate import check_sampling, gather_prompts
    from caa.hooks import steer_start
    from caa.sweep import parse_multipliers
    from caa.vectors import read_vectors

    _check_outputs([vectors, prompts_file, _model_file(model)], [(out_path, GENERATIONS)], force)

    options = _provenance(ctx)
    try:
        check_sampling(max_new_tokens, temperature, top_p, seed)
        mults = parse_multipliers(multipliers, include_zero=False)
        steer_start(steer_positions, 0)  # an unknown policy is refused before the model loads
        texts, labels = gather_prompts(prompt or [], prompts_file, limit)
        vecs = read_vectors(vectors)
        picked = vecs.pick(behavior)
        vecs.vector(picked, layer, scale)  # the vectors and options are checked before the model loads
        for line in vecs.absurd_norms([picked], [layer]):
            warn(line)
        _before_load(model, chat_template, None)
        loaded = _load(model, dtype, device_map, trust_remote_code, chat_template=chat_template)
        with err.status(f"generating {len(texts)} prompts x {len(mults)} multipliers"):
            gens = run(
                loaded,
                vecs,
                texts,
                layer,
                mults,
                behavior=behavior,
                max_new_tokens=max_new_tokens,
                steer_positions=steer_positions,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                chat_template=chat_template,
                scale=scale,
                labels=labels,
                provenance=options,
                inputs={"vectors": vectors, **({"prompts": prompts_file} if prompts_file else {})},
            )
        gens.save(out_path)
    except CaaError as e:
        fail(e)
    frame = gens.frame
    unit = "the layer's mean residual norm" if scale == "residual" else "the vector"
    title = f"{escape(frame.behavior.iloc[0])} at layer {layer} (multipliers of {unit})"
    table = Table("prompt", *[f"x{m:g}" for m in mults], title=title, show_lines=True)
    for _, group in frame.groupby("prompt_index", sort=True):
        table.add_row(
            escape(group.prompt.iloc[0], "\n"),
            *[escape(t, "\n") for t in group.sort_values("multiplier").text],
        )
    out.print(table)
    out.print(f"wrote {escape(str(out_path))}")
