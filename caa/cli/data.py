"""`caa ingest` and `caa datasets`: contrastive pairs in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from caa import api
from caa.api import CaaError
from caa.cli import render
from caa.cli.common import (
    ForceOpt,
    _check_outputs,
    _provenance,
    app,
    err,
    escape,
    fail,
    out,
    stage_options,
    warn,
)


@app.command()
def ingest(
    ctx: typer.Context,
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Pair files: .json (A/B list), .jsonl, .csv or .parquet; or the name of a built-in "
            "dataset (see caa datasets) where no file of that name exists."
        ),
    ],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output file.")] = Path("pairs.parquet"),
    behavior: Annotated[
        str | None, typer.Option(help="Behavior name for all files (default: each file's stem).")
    ] = None,
    mapping: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            help="Rename a column: FIELD=COLUMN, repeatable, "
            "e.g. --map positive=chosen --map negative=rejected.",
        ),
    ] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of pairs held out for evaluation.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the train/test split.")] = 0,
    skip_invalid: Annotated[
        bool,
        typer.Option(
            help="Keep the valid rows and list the rejected ones, instead of stopping at the first bad row."
        ),
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Read contrastive pairs into pairs.parquet, validated, with a stable train/test split.

    A/B files hold `question`, `answer_matching_behavior`, `answer_not_matching_behavior` (the paper's
    format); free-form files hold `prompt`, `positive`, `negative`. A pair keeps its split when other
    pairs are added; a pairs.parquet of caa ingest among the files keeps its behaviors, ids and splits.

    Example: [bold]caa ingest data/sycophancy.json data/sentiment.jsonl -o pairs.parquet[/]
    (or, with the built-in datasets, from any directory: [bold]caa ingest sycophancy sentiment[/])
    """
    files = _dataset_files(files)
    _check_outputs(list(files), [(out_path, api.OUTPUTS["pairs"])], force)
    try:
        options = stage_options(api.IngestOptions, ctx, mapping=api.parse_mapping(mapping or []))
        result = api.ingest(files, options)
        result.save(out_path, _provenance(ctx))
    except CaaError as e:
        fail(e)
    for message in result.duplicates:
        warn(message)
    for rejected in result.rejected:
        err.print(f"[yellow]rejected:[/] {escape(str(rejected))}")
    render.pairs(result)
    if result.rejected:
        out.print(f"{len(result.rejected)} rows rejected (listed above)")
    out.print(f"wrote {escape(str(out_path))}")


def _dataset_files(files: list[Path]) -> list[Path]:
    """The inputs of `caa ingest`, a built-in dataset's file in place of its name (said on stderr)."""
    resolved = []
    for arg in files:
        try:
            path, card = api.resolve_dataset(arg)
        except CaaError as e:
            fail(e)
        if card is not None:
            err.print(f"using the built-in dataset {escape(card.name)}: {escape(str(path))}")
        resolved.append(path)
    return resolved


@app.command()
def datasets() -> None:
    """List the datasets and neutral texts shipped with caa, with their cards.

    A dataset's name is what `caa ingest` takes; the neutral texts are `caa sweep`'s default --neutral.

    Example: [bold]caa datasets[/], then [bold]caa ingest sentiment formality -o pairs.parquet[/]
    """
    try:
        found = api.cards()
        where = api.data_dir()
    except CaaError as e:
        fail(e)
    render.datasets(found, where)
