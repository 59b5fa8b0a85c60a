"""The `caa` command line: parses options, calls the library, prints. No computation here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from caa.errors import CaaError

app = typer.Typer(
    name="caa",
    help="Contrastive Activation Addition: steering vectors from contrastive pairs, evaluated and applied.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Contrastive Activation Addition: ingest -> extract -> compute-vectors -> sweep -> generate.

    Layer l is the output of decoder block l (0-based): the residual stream after block l, which is
    hidden_states[l + 1] in transformers' terms.
    """
    if version:
        from caa import __version__

        out.print(f"caa {__version__}")
        raise typer.Exit(0)


def fail(e: CaaError) -> NoReturn:
    """The one place a domain error becomes a red message and exit code 2."""
    err.print(f"[bold red]error:[/] {escape(str(e))}")
    raise typer.Exit(2)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}")


@app.command()
def ingest(
    files: Annotated[list[Path], typer.Argument(help="Pair files: .json (A/B list), .jsonl, .csv or .parquet.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output file.")] = Path("pairs.parquet"),
    behavior: Annotated[str | None, typer.Option(help="Behavior name for all files (default: each file's stem).")
                        ] = None,
    map_: Annotated[list[str] | None, typer.Option("--map", help="Rename a column: FIELD=COLUMN, repeatable, "
                                                   "e.g. --map positive=chosen --map negative=rejected.")] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of pairs held out for evaluation.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the train/test split.")] = 0,
    skip_invalid: Annotated[bool, typer.Option(help="Keep the valid rows and list the rejected ones, "
                                               "instead of stopping at the first bad row.")] = False,
) -> None:
    """Read contrastive pairs into pairs.parquet, validated, with a stable train/test split.

    A/B files hold `question`, `answer_matching_behavior`, `answer_not_matching_behavior` (the paper's
    format); free-form files hold `prompt`, `positive`, `negative`. A pair keeps its split when other
    pairs are added.

    Example: [bold]caa ingest data/sycophancy.json data/sentiment.jsonl -o pairs.parquet[/]
    """
    from caa.ingest import ingest as run_ingest
    from caa.ingest import parse_mapping, write_pairs

    options = {"files": [str(f) for f in files], "behavior": behavior, "map": map_ or [],
               "test_fraction": test_fraction, "seed": seed, "skip_invalid": skip_invalid}
    try:
        result = run_ingest(files, behavior=behavior, mapping=parse_mapping(map_ or []),
                            test_fraction=test_fraction, seed=seed, skip_invalid=skip_invalid)
        write_pairs(result, out_path, files, options)
    except CaaError as e:
        fail(e)
    for message in result.duplicates:
        warn(message)
    for rejected in result.rejected:
        err.print(f"[yellow]rejected:[/] {escape(str(rejected))}")
    table = Table("behavior", "format", "train", "test", title=f"{len(result.pairs)} pairs")
    formats = {p.behavior: p.format for p in result.pairs}
    for name, counts in result.counts().items():
        table.add_row(name, formats[name], str(counts["train"]), str(counts["test"]))
    out.print(table)
    if result.rejected:
        out.print(f"{len(result.rejected)} rows rejected (listed above)")
    out.print(f"wrote {escape(str(out_path))}")
