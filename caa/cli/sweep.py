"""`caa sweep`: the evaluation grid, and how its tables are printed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from caa import api
from caa.api import CaaError
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
    TruncateOpt,
    _accelerator,
    _check_outputs,
    _device,
    _gc_paused,
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
from caa.cli.parse import parse_layers, parse_multipliers, parse_size


@app.command()
def sweep(
    ctx: typer.Context,
    vectors: Annotated[Path, typer.Argument(help="vectors.parquet from `caa compute-vectors`.")],
    pairs: Annotated[Path, typer.Argument(help="pairs.parquet from `caa ingest`; its test split is scored.")],
    out_path: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output table; beside it STEM.items.parquet (per item) and the plot STEM.png "
            "(STEM.plot.png when OUT is a .png).",
        ),
    ] = Path("sweep.parquet"),
    model: ModelOpt = "smollm2-135m",
    behaviors: Annotated[
        list[str] | None,
        typer.Option("--behavior", help="Behaviors to sweep (default: all in both files; repeatable)."),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Layers, e.g. 8,12,16 or 4-20 (default: the vectors' layers). "
            "Layer l is the output of decoder block l."
        ),
    ] = None,
    multipliers: Annotated[
        str, typer.Option(help="Comma-separated; 0 (unsteered) is always added.")
    ] = "-2,-1,0,1,2",
    max_pairs: Annotated[
        int | None, typer.Option(help="Score at most this many test pairs per behavior.")
    ] = None,
    neutral: Annotated[
        Path | None,
        typer.Option(
            help="Neutral texts for the fluency cost: prompts (.txt, one per line; .jsonl of "
            '{"prompt"}) whose greedy continuations are read, or with --steer-positions all texts '
            '(.jsonl of {"text"}) read at every position. Default: the built-in neutral_prompts.txt, '
            "or neutral_text.jsonl with all (see caa datasets)."
        ),
    ] = None,
    neutral_count: Annotated[int, typer.Option(help="How many neutral texts to use.")] = 16,
    max_kl: Annotated[
        float, typer.Option(help="Fluency budget for the recommendation: mean KL per token.")
    ] = 0.5,
    max_anti: Annotated[
        float | None,
        typer.Option(
            help="Recommend only layers where at most this share of items steers backwards "
            "(a negative slope), e.g. 0.2. Default: off."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap intervals.")] = 0,
    steer_positions: SteerOpt = "answer",
    scale: ScaleOpt = "raw",
    engine: Annotated[
        str,
        typer.Option(
            help="fast: compute each prompt's unsteered prefix once and reuse its KV cache across the "
            "grid; naive: the reference engine."
        ),
    ] = "fast",
    chat_template: TemplateOpt = "auto",
    truncate: TruncateOpt = False,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory for one batch, e.g. 8GiB; batches are sized to fit "
            "(default: half the free GPU memory; on CPU a quarter of the RAM, at most 4 GiB)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="At most this many rows (text x multiplier) per forward pass.")
    ] = None,
    side_effects: Annotated[
        str | None,
        typer.Option(
            "--side-effects",
            help="Comma-separated sets of pairs, e.g. capability,sycophancy: built-in dataset names "
            "(capability: general-knowledge questions, the built-in probe) or files of pairs in any "
            "format caa ingest reads, pairs.parquet included (ingested in memory). After the sweep, "
            "each behavior's recommended cell (else its best gain, said so) is scored on the test "
            "split of every other set, unsteered and steered: the change with its paired 95% interval, "
            "written to STEM.side_effects.parquet.",
        ),
    ] = None,
    side_effects_max_items: Annotated[
        int, typer.Option(help="Score at most this many held-out items of each --side-effects set.")
    ] = 50,
    prompting: Annotated[
        bool,
        typer.Option(
            "--prompting",
            help="Also score each behavior under a system prompt asking for it (positive) and one asking "
            "for the opposite (negative), crossed with the multipliers, and compare steering with "
            "prompting. The prompts come from the built-in datasets' cards, or --system-positive / "
            "--system-negative. A model without a chat template gets the prompt as a first paragraph.",
        ),
    ] = False,
    prompting_layer: Annotated[
        int | None,
        typer.Option(help="With --prompting: run the prompt arms at this swept layer only (default: all)."),
    ] = None,
    system_positive: Annotated[
        str | None,
        typer.Option(help="With --prompting: a system prompt asking for the behavior (overrides a card's)."),
    ] = None,
    system_negative: Annotated[
        str | None,
        typer.Option(help="With --prompting: a system prompt asking for the opposite (overrides a card's)."),
    ] = None,
    force: ForceOpt = False,
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Evaluate steering per layer x multiplier on held-out pairs, with its fluency cost and reliability.

    Score per A/B question: p(matching letter) / (p(A) + p(B)) at the answer position (the paper's);
    per free-form pair: log p(positive) - log p(negative). The fluency cost is the mean KL divergence
    from the unsteered to the steered next-token distribution where the steering acts: over the
    unsteered model's 32-token greedy continuations of neutral prompts (prompt unsteered), or with
    --steer-positions all over neutral text. Reliability: each gain's paired 95% interval, and per
    layer the items' slopes of score against multiplier, with the share that steers backwards.
    The recommended (layer, multiplier) is the largest gain whose interval lies above 0 and whose KL
    stays under --max-kl. Writes the table, the per-item table (STEM.items.parquet) and the plot
    together: all of them or none are replaced. With --prompting the tables gain the system-prompt
    arms (column system), and each behavior's steering gain is compared with its prompt's, each with
    its paired 95% interval over the same items.

    Example: [bold]caa sweep vectors.parquet pairs.parquet --layers 10,14,18 --multipliers -4,-2,0,2,4[/]
    """
    accelerator = _accelerator()  # under a launcher of several processes, the batches are shared out
    main = accelerator.is_main_process
    try:
        table_path, items_path, plot = api.sweep_paths(out_path)
    except CaaError as e:
        fail(e)
    neutral = neutral or api.default_neutral(steer_positions)
    kinds = api.OUTPUTS
    outputs = [(table_path, kinds["sweep"]), (items_path, kinds["sweep_items"]), (plot, kinds["plot"])]
    sets = tuple(side_effects.split(",")) if side_effects is not None else ()
    if sets:
        outputs.append((api.side_effects_path(table_path), kinds["sweep_side_effects"]))
    _check_outputs([vectors, pairs, neutral, _model_input(model), *map(Path, sets)], outputs, force, main)
    try:
        options = stage_options(
            api.SweepOptions,
            ctx,
            layers=parse_layers(layers) if layers else None,
            multipliers=parse_multipliers(multipliers),
            max_memory=parse_size(max_memory) if max_memory else None,
            side_effects=sets,
        )
        plan = api.plan_sweep(vectors, pairs, model, options, neutral)
        probes = api.read_probes(options.side_effects, options.side_effects_max_items) if sets else None
        for line in plan.warnings if main else []:
            warn(line)
        loaded = _load(
            model, dtype, device_map, trust_remote_code, _device(accelerator, device_map), chat_template
        )
        with _progress(disable=not main) as bar:  # type: ignore[attr-defined]
            side_work = api.probe_work(probes, plan.behaviors) if probes else 0
            task = bar.add_task("sweeping", total=plan.work(options.layers) + side_work, rate="")
            result = api.sweep(
                loaded,
                plan.vectors,
                plan.pairs,
                options,
                neutral=plan.neutral,
                neutral_source=str(plan.neutral_path),
                provenance={**_provenance(ctx), "neutral": str(neutral)},  # the neutral file used
                inputs={"vectors": vectors, "pairs": pairs, "neutral": neutral},
                tick=lambda n: bar.advance(task, n),
                notice=warn if main else None,
                accelerator=accelerator,
                probes=probes,
                prompts=plan.prompts,  # their warnings were said with the plan's
            )
        side_path = api.side_effects_path(table_path)
        had_side = side_path.exists()
        if main:
            with _gc_paused():  # matplotlib's import and the figure
                result.save(table_path)  # the table, the per-item table and the plot: all three or none
    except CaaError as e:
        fail(e)
    if main:
        render.sweep(result, max_kl, max_anti)
        out.print(f"wrote {escape(str(table_path))}, {escape(str(items_path))} and {escape(str(plot))}")
        if result.side_effects is not None:
            render.side_effects(result.side_effects)
            out.print(f"wrote {escape(str(side_path))}")
        elif had_side and not side_path.exists():
            out.print(f"removed {escape(str(side_path))} (an earlier run's side effects)")
