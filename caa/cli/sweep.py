"""`caa sweep`: the evaluation grid, and how its tables are printed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.table import Table

from caa.errors import CaaError

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
    TruncateOpt,
    _before_load,
    _check_outputs,
    _load,
    _model_file,
    _progress,
    _provenance,
    _require,
    app,
    escape,
    fail,
    out,
    warn,
)


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
    behavior: Annotated[
        list[str] | None, typer.Option(help="Behaviors to sweep (default: all in both files).")
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
    together: all of them or none are replaced.

    Example: [bold]caa sweep vectors.parquet pairs.parquet --layers 10,14,18 --multipliers -4,-2,0,2,4[/]
    """
    from caa.api import sweep as run
    from caa.artifacts import PLOT, SWEEP, SWEEP_ITEMS, sweep_paths
    from caa.budget import parse_size
    from caa.extract import parse_layers
    from caa.hooks import steer_start
    from caa.ingest import PairSet
    from caa.sweep import default_neutral, held_out, parse_multipliers, read_neutral, sweep_work
    from caa.vectors import read_vectors

    try:
        table_path, items_path, plot = sweep_paths(out_path)
    except CaaError as e:
        fail(e)
    if neutral is None:
        neutral = default_neutral(steer_positions)
    inputs = [vectors, pairs, neutral, _model_file(model)]
    _check_outputs(inputs, [(table_path, SWEEP), (items_path, SWEEP_ITEMS), (plot, PLOT)], force)
    options = {**_provenance(ctx), "neutral": str(neutral)}  # the neutral file used, default or not
    try:
        if max_memory is not None:
            parse_size(max_memory)  # refused before the model loads
        _require(batch_size is None or batch_size >= 1, f"--batch-size {batch_size}: must be at least 1")
        _require(max_pairs is None or max_pairs >= 1, f"--max-pairs {max_pairs}: must be at least 1")
        _require(neutral_count >= 1, f"--neutral-count {neutral_count}: must be at least 1")
        _require(max_kl >= 0, f"--max-kl {max_kl}: must be 0 or above")
        _require(max_anti is None or 0 <= max_anti <= 1, f"--max-anti {max_anti}: must be between 0 and 1")
        _require(0 <= seed < 2**32, f"--seed {seed}: must be between 0 and 2**32 - 1")
        steer_start(steer_positions, 0)  # an unknown policy is refused before the model loads
        mults = parse_multipliers(multipliers)
        vecs, pair_set = read_vectors(vectors), PairSet.read(pairs)
        names, test = held_out(vecs, pair_set.frame, pairs, behavior, max_pairs)
        early = _before_load(model, chat_template, layers)  # --layers against the model's config
        for name in names:
            for chosen_layer in vecs.require(name, early):
                vecs.vector(name, chosen_layer, scale)  # --scale residual needs the residual norms
        for line in vecs.absurd_norms(names):
            warn(line)
        texts = read_neutral(neutral, neutral_count, steer_positions)
        loaded = _load(model, dtype, device_map, trust_remote_code, chat_template=chat_template)
        chosen = parse_layers(layers, loaded.num_layers) if layers else None
        with _progress() as bar:  # type: ignore[attr-defined]
            task = bar.add_task("sweeping", total=sweep_work(vecs, test, names, chosen, len(texts)), rate="")
            result = run(
                loaded,
                vecs,
                pair_set,
                chosen,
                mults,
                texts,
                behaviors=names,
                max_pairs=max_pairs,
                steer_positions=steer_positions,
                max_kl=max_kl,
                max_anti=max_anti,
                engine=engine,
                seed=seed,
                chat_template=chat_template,
                truncate=truncate,
                max_memory=max_memory,
                batch_size=batch_size,
                scale=scale,
                neutral_source=str(neutral),
                provenance=options,
                inputs={"vectors": vectors, "pairs": pairs, "neutral": neutral},
                tick=lambda n: bar.advance(task, n),
                notice=warn,
            )
        result.save(table_path)  # the table, the per-item table and the plot: all three or none
    except CaaError as e:
        fail(e)
    _print_sweep(result, max_kl, max_anti)
    out.print(f"wrote {escape(str(table_path))}, {escape(str(items_path))} and {escape(str(plot))}")


def _print_sweep(result: Any, max_kl: float, max_anti: float | None) -> None:
    from caa.scoring import fluency_label

    def num(x: float, fmt: str) -> str:
        return "-" if x != x else fmt.format(x)

    residual = (result.meta.get("options") or {}).get("scale") == "residual"
    unit = "the layer's mean residual norm" if residual else "the vector"
    for name, part in result.table.groupby("behavior", sort=False):
        kind = "p(match)" if part.score_kind.iloc[0] == "p_match" else "log p(pos) - log p(neg)"
        table = Table(
            "layer",
            "mult",
            "score",
            "± sem",
            "delta",
            "95% CI",
            "KL",
            "ppl",
            "Δppl",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            title=f"{escape(name)}: score = {kind} on {part.n.iloc[0]} held-out pairs; "
            f"delta's paired 95% CI; KL {fluency_label(result.fluency)}; multipliers of {unit}",
        )
        for r in part.itertuples():
            digits = 3 if r.score_kind == "p_match" else 2
            ci = (
                ""
                if r.multiplier == 0
                else "-"
                if r.delta_low != r.delta_low
                else f"{r.delta_low:+.{digits}f}..{r.delta_high:+.{digits}f}"
            )
            table.add_row(
                str(r.layer),
                f"{r.multiplier:g}",
                f"{r.score_mean:.3f}",
                num(r.score_sem, "{:.3f}"),
                f"{r.delta:+.3f}",
                ci,
                f"{r.kl_mean:.3f}",
                f"{r.perplexity:.2f}",
                f"{r.perplexity_delta:+.2f}",
            )
        out.print(table)
        _print_steerability(part)
        _print_recommendation(result, name, part, max_kl, max_anti)


def _print_steerability(part: Any) -> None:
    """Per layer: the items' slopes, and the share (with its interval) that steers backwards."""
    table = Table(
        "layer",
        "mean slope",
        "median",
        "anti-steerable",
        "95% CI",
        "most backwards",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title="per-item steerability (slope of each item's score against the multiplier)",
    )
    for _, r in part.drop_duplicates("layer").iterrows():
        if r.anti_fraction != r.anti_fraction:
            table.add_row(str(r.layer), "-", "-", "-", "-", "")
            continue
        table.add_row(
            str(r.layer),
            f"{r.slope_mean:+.4f}",
            f"{r.slope_median:+.4f}",
            f"{r.anti_fraction:.0%}",
            f"[{r.anti_low:.0%}, {r.anti_high:.0%}]",
            escape(", ".join(i[:8] for i in r.backward_items[:2])),
        )
    out.print(table)


def _print_recommendation(result: Any, name: str, part: Any, max_kl: float, max_anti: float | None) -> None:
    budget = f"KL <= {max_kl:g}" + (f", anti-steerable <= {max_anti:.0%}" if max_anti is not None else "")

    def anti(layer: int) -> str:
        value = part[part.layer == layer].anti_fraction.iloc[0]
        return "" if value != value else f"; {value:.0%} of items steer backwards at this layer"

    pick, best = result.recommended.get(name), result.best.get(name)
    if pick:
        out.print(
            f"[bold]recommended for {escape(name)}: layer {pick[0]}, multiplier {pick[1]:g}[/] "
            f"(largest gain whose 95% interval is above 0, with {budget}{anti(pick[0])})"
        )
    elif best:
        out.print(
            f"[yellow]no cell steers {escape(name)} reliably[/] with {budget}: the best, layer {best[0]} "
            f"x{best[1]:g}, has a gain whose 95% interval includes 0{anti(best[0])}"
        )
    else:
        out.print(f"no (layer, multiplier) raises the {escape(name)} score with {budget}")
