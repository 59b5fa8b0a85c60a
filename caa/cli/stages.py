"""`caa extract` and `caa compute-vectors`: activations and steering vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.table import Column, Table

from caa.cli.common import (
    DeviceMapOpt,
    DtypeOpt,
    ForceOpt,
    ModelOpt,
    RemoteOpt,
    TemplateOpt,
    TruncateOpt,
    _check_outputs,
    _device,
    _load,
    _model_file,
    _options_for,
    _progress,
    _provenance,
    app,
    err,
    escape,
    fail,
    out,
    warn,
)
from caa.errors import CaaError


@app.command()
def extract(
    ctx: typer.Context,
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
    truncate: TruncateOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run from its finished batches (kept in OUT.partial/); "
            "the inputs and options must be the same.",
        ),
    ] = False,
    force: ForceOpt = False,
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Record residual-stream activations of both sides of every pair at every requested layer.

    Layer l is the output of decoder block l (0-based): the residual stream after block l, which is
    hidden_states[l + 1] in transformers except for the last block, where transformers applies the
    final norm; caa records the block's own output there too. The forward pass stops after the
    deepest requested layer. Under `accelerate launch -m caa extract ...` the pairs are sharded over
    the processes and merged into one file. Finished batches are kept in OUT.partial/ until the run
    ends: after Ctrl-C or a crash, the same command with --resume continues where it stopped.

    Example: [bold]caa extract pairs.parquet --layers 8-20 -o activations.parquet[/]
    """
    from accelerate import Accelerator

    from caa.stages.extract import run_extract
    from caa.stages.plans import plan_extract
    from caa.store.schemas import ACTIVATIONS

    accelerator = Accelerator()
    main = accelerator.is_main_process
    _check_outputs([pairs, _model_file(model)], [(out_path, ACTIVATIONS)], force, main)
    try:
        frame = plan_extract(**_options_for(plan_extract, ctx.params, out=out_path, behaviors=behavior))
        loaded = _load(
            model, dtype, device_map, trust_remote_code, _device(accelerator, device_map), chat_template
        )
        share = len(frame.iloc[accelerator.process_index :: accelerator.num_processes])
        with _progress(disable=not main) as bar:  # type: ignore[attr-defined]
            task = bar.add_task("extracting", total=share, rate="")

            def advance(texts: int) -> None:
                bar.advance(task, texts / 2)
                speed = bar.tasks[task].speed
                bar.update(task, rate=f"{speed:.1f} pairs/s" if speed else "")

            n = run_extract(
                **_options_for(
                    run_extract,
                    ctx.params,
                    pairs=frame,
                    pairs_path=pairs,
                    out=out_path,
                    loaded=loaded,
                    layers_spec=layers,
                    options=_provenance(ctx),
                    on_texts=advance,
                    notice=warn,
                    accelerator=accelerator,
                )
            )
    except CaaError as e:
        fail(e)
    except KeyboardInterrupt:
        _interrupted(out_path, main)
    if main:
        out.print(f"recorded {n} pairs x 2 sides at {escape(layers)} layers -> wrote {escape(str(out_path))}")


def _interrupted(out_path: Path, main: bool) -> NoReturn:
    """Ctrl-C during extract: say where the finished batches are kept, and how to go on."""
    from caa.store.checkpoint import partial_dir

    if main:
        kept = escape(str(partial_dir(out_path)))
        err.print(
            f"[yellow]interrupted:[/] the finished batches are kept in {kept}; "
            "run the same command with --resume to continue"
        )
    raise typer.Exit(130) from None


@app.command("compute-vectors")
def compute_vectors_cmd(
    ctx: typer.Context,
    activations: Annotated[list[Path], typer.Argument(help="activations.parquet from `caa extract`.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output file.")] = Path("vectors.parquet"),
    method: Annotated[
        str,
        typer.Option(
            help="mean (mean difference, the paper's) or pca (first principal component of the differences)."
        ),
    ] = "mean",
    force: ForceOpt = False,
) -> None:
    """Mean-difference steering vectors per behavior and layer, with diagnostics to pick layers.

    Diagnostics per layer: the vector's norm, the mean residual norm there, cosine with the vectors
    of the adjacent layers, and separability on the held-out split (share of test pairs whose
    positive - negative projects positively, and the AUC of the projections).

    Example: [bold]caa compute-vectors activations.parquet -o vectors.parquet[/]
    """
    from caa.stages.extract import read_activations
    from caa.stages.vectors import vector_rows, write_vectors
    from caa.store.schemas import VECTORS

    _check_outputs(list(activations), [(out_path, VECTORS)], force)
    try:
        acts = read_activations(activations)
        frame = vector_rows(acts, method)
        write_vectors(frame, out_path, acts, _provenance(ctx))
    except CaaError as e:
        fail(e)
    _print_vectors(frame, method)
    out.print(f"wrote {escape(str(out_path))}")


def _print_vectors(frame: Any, method: str) -> None:
    """The vectors and their diagnostics, one row per behavior x layer."""
    table = Table(
        Column("behavior", no_wrap=True),
        "layer",
        "n",
        "|v|",
        "|h|",
        "v/h",
        "cos-1",
        "cos+1",
        "cons",
        "acc",
        "AUC",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),  # one space between columns: the table fits an 80-column terminal
        title=f"{method} vectors",
        caption="|h|: mean residual norm; v/h: |v| / |h|; cos±1: with the adjacent layers' vectors; cons: "
        "mean cosine of the training pairs' differences with their mean; acc, AUC: separability on the "
        "test split",
    )

    def num(x: object, fmt: str = "{:.3f}") -> str:
        return "-" if x is None or x != x else fmt.format(x)

    for r in frame.itertuples():
        table.add_row(
            escape(r.behavior),
            str(r.layer),
            str(r.n_train),
            num(r.vector_norm, "{:.2f}"),
            num(r.mean_residual_norm, "{:.0f}"),
            num(r.norm_ratio),
            num(r.cos_prev_layer, "{:.2f}"),
            num(r.cos_next_layer, "{:.2f}"),
            num(r.pair_consistency, "{:.2f}"),
            num(r.test_accuracy, "{:.2f}"),
            num(r.test_auc, "{:.2f}"),
        )
    out.print(table)
