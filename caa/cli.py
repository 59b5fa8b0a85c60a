"""The `caa` command line: parses options, calls the library, prints. No computation here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from caa.errors import CaaError

if TYPE_CHECKING:
    from caa.models import LoadedModel

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
    files: Annotated[
        list[Path], typer.Argument(help="Pair files: .json (A/B list), .jsonl, .csv or .parquet.")
    ],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output file.")] = Path("pairs.parquet"),
    behavior: Annotated[
        str | None, typer.Option(help="Behavior name for all files (default: each file's stem).")
    ] = None,
    map_: Annotated[
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
) -> None:
    """Read contrastive pairs into pairs.parquet, validated, with a stable train/test split.

    A/B files hold `question`, `answer_matching_behavior`, `answer_not_matching_behavior` (the paper's
    format); free-form files hold `prompt`, `positive`, `negative`. A pair keeps its split when other
    pairs are added.

    Example: [bold]caa ingest data/sycophancy.json data/sentiment.jsonl -o pairs.parquet[/]
    """
    from caa.ingest import ingest as run_ingest
    from caa.ingest import parse_mapping, write_pairs

    options = {
        "files": [str(f) for f in files],
        "behavior": behavior,
        "map": map_ or [],
        "test_fraction": test_fraction,
        "seed": seed,
        "skip_invalid": skip_invalid,
    }
    try:
        result = run_ingest(
            files,
            behavior=behavior,
            mapping=parse_mapping(map_ or []),
            test_fraction=test_fraction,
            seed=seed,
            skip_invalid=skip_invalid,
        )
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


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Embedded alias (smollm2-135m), model directory, .gguf file or hub id."
    ),
]
DtypeOpt = Annotated[
    str, typer.Option(help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option("--device-map", help="e.g. auto: spread a model too large for one GPU over several."),
]
RemoteOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow the model's own Python code (off unless asked).")
]
TemplateOpt = Annotated[
    str,
    typer.Option(
        "--chat-template",
        help="auto: the tokenizer's chat template if it has one; on: require it; off: plain text.",
    ),
]


def _load(
    model: str, dtype: str, device_map: str | None, trust_remote_code: bool, device: Any = None
) -> LoadedModel:
    """Load a model quietly (transformers' own progress bars off), with a status line for slow steps."""
    from transformers.utils import logging as hf_logging

    from caa.models import load_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with err.status(f"loading {escape(model)}"):
        return load_model(
            model,
            dtype=dtype,
            device=device,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            progress=lambda m: err.print(escape(m)),
        )


def _progress(disable: bool = False) -> object:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        disable=disable,
    )


@app.command()
def extract(
    pairs: Annotated[Path, typer.Argument(help="pairs.parquet from `caa ingest`.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output file.")] = Path("activations.parquet"),
    model: ModelOpt = "smollm2-135m",
    layers: Annotated[
        str,
        typer.Option(
            help="Layers to record: all, 12, 8,12,16 or 4-20. Layer l is the "
            "output of decoder block l (0-based) = hidden_states[l + 1]."
        ),
    ] = "all",
    split: Annotated[str, typer.Option(help="Which pairs: all, train or test.")] = "all",
    behavior: Annotated[list[str] | None, typer.Option(help="Only these behaviors (repeatable).")] = None,
    position: Annotated[
        str,
        typer.Option(
            help="Free-form pairs: read the last completion token (last) or "
            "average the completion's tokens (mean). A/B pairs are always "
            "read at the answer letter."
        ),
    ] = "last",
    chat_template: TemplateOpt = "auto",
    batch_size: Annotated[
        int, typer.Option(help="Texts per forward pass (halved on CUDA out-of-memory).")
    ] = 32,
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Record residual-stream activations of both sides of every pair at every requested layer.

    Layer l is the output of decoder block l (0-based): the residual stream after block l, which is
    hidden_states[l + 1] in transformers except for the last block, where transformers applies the
    final norm; caa records the block's own output there too. The forward pass stops after the
    deepest requested layer. Under `accelerate launch -m caa extract ...` the pairs are sharded over
    the processes and merged into one file.

    Example: [bold]caa extract pairs.parquet --layers 8-20 -o activations.parquet[/]
    """
    from accelerate import Accelerator

    from caa.extract import read_pairs, run_extract, select_pairs

    if batch_size < 1:
        fail(CaaError(f"--batch-size {batch_size}: must be at least 1"))
    accelerator = Accelerator()
    options = {
        "pairs": str(pairs),
        "model": model,
        "layers": layers,
        "split": split,
        "behavior": behavior or [],
        "position": position,
        "chat_template": chat_template,
        "batch_size": batch_size,
        "dtype": dtype,
        "device_map": device_map,
    }
    try:
        frame = select_pairs(read_pairs(pairs)[0], pairs, split, behavior)  # fail fast, before the model
        loaded = _load(
            model, dtype, device_map, trust_remote_code, device=None if device_map else accelerator.device
        )
        share = len(frame.iloc[accelerator.process_index :: accelerator.num_processes])
        with _progress(disable=not accelerator.is_main_process) as bar:  # type: ignore[attr-defined]
            task = bar.add_task("extracting", total=share, rate="")

            def advance(texts: int) -> None:
                bar.advance(task, texts / 2)
                speed = bar.tasks[task].speed
                bar.update(task, rate=f"{speed:.1f} pairs/s" if speed else "")

            n = run_extract(
                frame,
                pairs,
                out_path,
                loaded,
                layers,
                position=position,
                chat_template=chat_template,
                batch_size=batch_size,
                options=options,
                on_texts=advance,
                notice=warn,
                accelerator=accelerator,
            )
    except CaaError as e:
        fail(e)
    if accelerator.is_main_process:
        out.print(f"recorded {n} pairs x 2 sides at {escape(layers)} layers -> wrote {escape(str(out_path))}")


@app.command("compute-vectors")
def compute_vectors_cmd(
    activations: Annotated[list[Path], typer.Argument(help="activations.parquet from `caa extract`.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output file.")] = Path("vectors.parquet"),
    method: Annotated[
        str,
        typer.Option(
            help="mean (mean difference, the paper's) or pca (first principal component of the differences)."
        ),
    ] = "mean",
) -> None:
    """Mean-difference steering vectors per behavior and layer, with diagnostics to pick layers.

    Diagnostics per layer: the vector's norm, the mean residual norm there, cosine with the vectors
    of the adjacent layers, and separability on the held-out split (share of test pairs whose
    positive - negative projects positively, and the AUC of the projections).

    Example: [bold]caa compute-vectors activations.parquet -o vectors.parquet[/]
    """
    from caa.vectors import compute_vectors, read_activations, write_vectors

    try:
        acts = read_activations(activations)
        frame = compute_vectors(acts, method)
        write_vectors(frame, out_path, acts, {"activations": [str(a) for a in activations], "method": method})
    except CaaError as e:
        fail(e)
    table = Table(
        Column("behavior", no_wrap=True),
        "layer",
        "n",
        "|v|",
        "|h|",
        "v/h",
        "cos-1",
        "cos+1",
        "acc",
        "AUC",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title=f"{method} vectors (|h|: mean residual norm; v/h: |v| / |h|; "
        "cos±1: with the adjacent layers' vectors; acc, AUC: separability on the test split)",
    )

    def num(x: object, fmt: str = "{:.3f}") -> str:
        return "-" if x is None or x != x else fmt.format(x)

    for r in frame.itertuples():
        table.add_row(
            r.behavior,
            str(r.layer),
            str(r.n_train),
            num(r.vector_norm, "{:.2f}"),
            num(r.mean_residual_norm, "{:.1f}"),
            num(r.vector_norm / r.mean_residual_norm),
            num(r.cos_prev_layer),
            num(r.cos_next_layer),
            num(r.test_accuracy),
            num(r.test_auc),
        )
    out.print(table)
    out.print(f"wrote {escape(str(out_path))}")
