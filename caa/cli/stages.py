"""`caa extract` and `caa compute-vectors`: activations and steering vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

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
    TemplateOpt,
    TruncateOpt,
    _accelerator,
    _check_outputs,
    _device,
    _load,
    _model_input,
    _progress,
    _provenance,
    app,
    err,
    escape,
    fail,
    out,
    stage_options,
    warn,
)
from caa.cli.parse import parse_layers


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
    behaviors: Annotated[
        list[str] | None, typer.Option("--behavior", help="Only these behaviors (repeatable).")
    ] = None,
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
    deepest requested layer. Under `accelerate launch -m caa extract ...` (or torchrun) whole batches
    are shared over the processes and merged into the file one process writes. Finished batches
    are kept in OUT.partial/ until the run ends: after Ctrl-C or a crash, the same command with
    --resume continues where it stopped.

    Example: [bold]caa extract pairs.parquet --layers 8-20 -o activations.parquet[/]
    """
    accelerator = _accelerator()  # under a launcher of several processes, the batches are shared out
    main = accelerator.is_main_process
    outputs = [(out_path, api.OUTPUTS["activations"])]
    partial = (api.partial_dir(out_path),)  # the finished batches, kept until the run ends
    _check_outputs([pairs, _model_input(model)], outputs, force, main, partial)
    try:
        options = stage_options(api.ExtractOptions, ctx, layers=parse_layers(layers))
        frame = api.plan_extract(pairs, out_path, model, options, resume)
        loaded = _load(
            model, dtype, device_map, trust_remote_code, _device(accelerator, device_map), chat_template
        )
        share = api.extract_share(frame, options, accelerator)
        with _progress(disable=not main) as bar:  # type: ignore[attr-defined]
            task = bar.add_task("extracting", total=share, rate="")

            def advance(texts: int) -> None:
                bar.advance(task, texts / 2)
                speed = bar.tasks[task].speed
                bar.update(task, rate=f"{speed:.1f} pairs/s" if speed else "")

            n = api.extract_to_file(
                loaded,
                frame,
                pairs,
                out_path,
                options,
                resume=resume,
                provenance=_provenance(ctx),
                on_texts=advance,
                notice=warn,
                accelerator=accelerator,
            )
    except CaaError as e:
        fail(e)
    except KeyboardInterrupt:
        _interrupted(out_path, main)
    if main:
        where = "every layer" if layers.strip() == "all" else f"layers {escape(layers)}"
        out.print(f"recorded {n} pairs x 2 sides at {where} -> wrote {escape(str(out_path))}")


def _interrupted(out_path: Path, main: bool) -> NoReturn:
    """Ctrl-C during extract: say where the finished batches are kept, and how to go on."""
    if main:
        kept = escape(str(api.partial_dir(out_path)))
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
    _check_outputs(list(activations), [(out_path, api.OUTPUTS["vectors"])], force)
    try:
        vectors = api.compute_vectors(api.read_activations(activations), method, provenance=_provenance(ctx))
        vectors.save(out_path)
    except CaaError as e:
        fail(e)
    render.vectors(vectors.frame, method)
    out.print(f"wrote {escape(str(out_path))}")
