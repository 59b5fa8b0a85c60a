"""`caa report`, `caa export`, `caa import` and `caa inspect`: files in and out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from caa import api
from caa.api import CaaError
from caa.cli.parse import parse_layers

if TYPE_CHECKING:
    pass

from caa.cli import render_files
from caa.cli.common import (
    DtypeOpt,
    ForceOpt,
    ModelOpt,
    RemoteOpt,
    ScaleOpt,
    _check_outputs,
    _load,
    _model_input,
    _require,
    app,
    escape,
    fail,
    out,
    warn,
)


@app.command()
def report(
    paths: Annotated[
        list[Path], typer.Argument(help="A run's directory (every caa *.parquet in it), or artifact files.")
    ],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output file.")] = Path("report.html"),
    max_prompts: Annotated[int, typer.Option(help="Prompts shown per generations table.")] = 12,
    check_inputs: Annotated[
        bool, typer.Option(help="Hash the recorded input files again to tell whether they changed.")
    ] = True,
    force: ForceOpt = False,
) -> None:
    """Write one self-contained HTML page on a run: vector diagnostics, the sweep, generations, provenance.

    Per behavior: the vectors' diagnostics per layer (table and figure), the sweep's scores, fluency
    cost, reliability and recommendation, and the generations side by side per multiplier; then what
    made every file, with warnings where an input changed or is missing. A kind that is not among the
    inputs leaves its section out. The page loads nothing from the network: it works offline.

    Example: [bold]caa report demo-out -o demo-out/report.html[/]
    """
    try:
        _require(max_prompts >= 1, f"--max-prompts {max_prompts}: must be at least 1")
        run = api.find_artifacts(paths)
    except CaaError as e:
        fail(e)
    _check_outputs([f.path for f in run.files], [(out_path, api.OUTPUTS["report"])], force)
    try:
        page = api.build_report(run, check_inputs=check_inputs, max_prompts=max_prompts, title=_title(paths))
        api.write_report(page, out_path)
    except CaaError as e:
        fail(e)
    for message in page.warnings:
        warn(message)
    count = len(run.files)
    out.print(f"wrote {escape(str(out_path))} ({count} file{'s' if count != 1 else ''})")


def _title(paths: list[Path]) -> str:
    """The report's title: the run directory's name, or the first file's."""
    name = paths[0].resolve().name if len(paths) == 1 and paths[0].is_dir() else paths[0].name
    return f"caa report: {name}"


@app.command("export")
def export_cmd(
    vectors: Annotated[
        Path, typer.Argument(help="vectors.parquet from `caa compute-vectors` or `caa import`.")
    ],
    out_path: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output file: .gguf, .safetensors, .npy, .npz, or .pt (lm-eval)."),
    ],
    format_: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="gguf (a llama.cpp control vector), safetensors, npy (one layer), npz, or lm-eval "
            "(lm-evaluation-harness's steered model, a .pt file) (default: the output's suffix).",
        ),
    ] = None,
    behavior: Annotated[
        str | None, typer.Option(help="Behavior (needed when the file holds several).")
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Layers to export, e.g. 8-20 or 12 (default: all the file has). Layer l is the output "
            "of decoder block l (0-based); gguf cannot hold layer 0."
        ),
    ] = None,
    multiplier: Annotated[
        float,
        typer.Option(
            help="Bake this strength into the exported vectors (lm-eval: its steering_coefficient)."
        ),
    ] = 1.0,
    scale: ScaleOpt = "raw",
    force: ForceOpt = False,
) -> None:
    """Write one behavior's vectors for other tools: llama.cpp, lm-eval, safetensors, .npy or .npz.

    gguf: one F32 tensor direction.N per layer N. llama.cpp adds direction.N to the output of decoder
    block N at every position, prompt included: caa's layer N under --steer-positions all, no shift.
    It has no direction.0, so layer 0 is refused. Apply it with
    llama-cli -m model.gguf --control-vector-scaled happy.gguf:2.0 --control-vector-layer-range 8 20.
    safetensors: tensors layer.N, with the model fingerprint and the layer convention in the metadata;
    npz: arrays layer_N; npy: one layer's vector (d_model values).
    lm-eval: what lm-evaluation-harness's steered model loads (lm-eval 0.4.13), a .pt dict keyed by
    hookpoint (layers.N for Llama: block N's output), with steering_vector (the vector, or with --scale
    residual its direction at the residual norm), steering_coefficient (--multiplier), action add.
    lm-eval adds coefficient x vector at every position, prompt included: caa's --steer-positions all
    (compare with caa sweep --steer-positions all). Run it with
    lm_eval --model steered --model_args pretrained=MODEL_DIR,steer_path=happy.pt --tasks ...

    Example: [bold]caa export vectors.parquet --format gguf --layers 8-20 -o happy.gguf[/]
    """
    _check_outputs([vectors], [(out_path, api.OUTPUTS["export"])], force)
    try:
        fmt = api.export_format(format_, out_path)
        vecs = api.VectorSet.read(vectors)
        count = (vecs.meta.get("model") or {}).get("num_layers") or int(vecs.frame.layer.max()) + 1
        chosen = api.model_layers(parse_layers(layers), count) if layers not in (None, "all") else None
        done = api.export_vectors(
            vecs, out_path, fmt, behavior=behavior, layers=chosen, multiplier=multiplier, scale=scale
        )
    except CaaError as e:
        fail(e)
    out.print(
        f"wrote {escape(str(out_path))}: {done.format}, '{escape(done.behavior)}' at layers "
        f"{api.layer_spans(done.layers)}, x{done.multiplier:g}"
    )
    if done.hookpoints is not None:
        pretrained = api.transformers_path(vecs.meta.get("model") or {}) or "MODEL_DIR"
        out.print(
            f"hookpoints {', '.join(done.hookpoints)}. lm-eval's steered model adds the vector at every "
            "position, prompt included: caa's --steer-positions all. Run it with\n"
            f"lm_eval --model steered --model_args pretrained={escape(pretrained)},"
            f"steer_path={escape(str(out_path))} --tasks ...",
            soft_wrap=True,
        )


@app.command("import")
def import_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            help="A llama.cpp/repeng control vector (.gguf), .safetensors, .npy or .npz arrays, or a "
            "SAELens sparse-autoencoder directory (cfg.json + sae_weights.safetensors)."
        ),
    ],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output file.")] = Path("vectors.parquet"),
    model: ModelOpt = "smollm2-135m",
    behavior: Annotated[
        str | None,
        typer.Option(
            help="Behavior name (default: the one a caa export recorded, feature_K for an SAE "
            "feature, else the file's stem)."
        ),
    ] = None,
    layer: Annotated[
        int | None,
        typer.Option(
            help="The layer of a lone array (a .npy, a single tensor), or the one layer to take from a "
            "file that names its layers."
        ),
    ] = None,
    feature: Annotated[
        int | None, typer.Option(help="SAE directory: the feature K; its vector is the decoder row W_dec[K].")
    ] = None,
    force: ForceOpt = False,
    dtype: DtypeOpt = "auto",
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Read steering vectors made elsewhere into vectors.parquet, for sweep, generate and export.

    Layers (layer l is the output of decoder block l, 0-based): a control vector's direction.N is
    layer N (llama.cpp adds it to the output of block N); safetensors layer.N and npz layer_N are
    layer N; an SAE's blocks.L.hook_resid_post is layer L and blocks.L.hook_resid_pre is layer L - 1
    (the input of block L is the output of block L - 1); other hooks are refused. The vectors are
    checked against --model (hidden size, layer count) and carry its fingerprint. They have no
    training pairs, so the diagnostics that need activations are empty.

    Example: [bold]caa import sae-dir --feature 1234 -m smollm2-135m -o vectors.parquet[/]
    """
    _check_outputs([source, _model_input(model)], [(out_path, api.OUTPUTS["vectors"])], force)
    options = {
        "source": str(source),
        "model": model,
        "behavior": behavior,
        "layer": layer,
        "feature": feature,
        "dtype": dtype,
    }
    try:
        if behavior is not None:
            behavior = api.check_behavior("behavior", behavior)
        foreign = api.read_foreign(source, layer=layer, feature=feature)
        api.check_layers(foreign, api.config_num_layers(model), model)  # before the model loads, where it can
        loaded = _load(model, dtype, None, trust_remote_code)
        vecs = api.import_vectors(foreign, loaded.fingerprint.to_dict(), behavior, options)
        vecs.save(out_path)
    except CaaError as e:
        fail(e)
    out.print(
        f"imported '{escape(vecs.behaviors()[0])}' at layers {api.layer_spans(list(foreign.vectors))} from "
        f"{escape(str(source))} ({foreign.source['format']}) -> wrote {escape(str(out_path))}"
    )


@app.command("inspect")
def inspect_cmd(
    file: Annotated[
        Path,
        typer.Argument(help="A caa artifact: pairs, activations, vectors, sweep or generations .parquet."),
    ],
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the full metadata and the summary as JSON on stdout instead."),
    ] = False,
    check_inputs: Annotated[
        bool, typer.Option(help="Hash the recorded input files again to tell whether they changed.")
    ] = True,
) -> None:
    """Print an artifact's metadata (command, options, model, inputs) and a summary of its contents.

    The summary depends on the kind: pairs per behavior and split; the layers, pairs and d_model of
    activations; the layers, norms and test AUC of vectors; the grid and recommendation of a sweep;
    the prompts and multipliers of generations. Only the columns the summary needs are read (never
    the activation vectors). An input file that changed or disappeared since the artifact was written
    is noted (relative paths are looked up from the current directory).

    Example: [bold]caa inspect vectors.parquet[/]   or   [bold]caa inspect sweep.parquet --json[/]
    """
    import json

    try:
        report = api.inspect_artifact(file, check_inputs=check_inputs)
    except CaaError as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    render_files.inspection(file, report)
