"""The `caa` command line: parses options, calls the library, prints. No computation here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Column, Table
from typer.core import TyperGroup

from caa.errors import CaaError
from caa.generate import MIN_TEMPERATURE
from caa.text import clean, text_problem

if TYPE_CHECKING:
    from caa.models import LoadedModel


class _CheckedGroup(TyperGroup):
    """The command group: every command-line argument is checked as text (see caa.text) before
    any command runs; Python hands over argv bytes that are not UTF-8 as surrogates."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        for i, arg in enumerate(args):
            if text_problem(arg):
                name, value = self._argument(ctx, args, i)
                fail(CaaError(f"{name}: {text_problem(value)}"))
        return super().parse_args(ctx, args)

    def _argument(self, ctx: Any, args: list[str], i: int) -> tuple[str, str]:
        """(the option whose value ``args[i]`` is, or the argument itself escaped; the value)."""
        option, eq, value = args[i].partition("=")
        if eq and option.startswith("--") and not text_problem(option):
            return option, value
        command = self.get_command(ctx, args[0]) if args and not text_problem(args[0]) else None
        valued = {
            o for p in getattr(command, "params", []) if not getattr(p, "is_flag", True) for o in p.opts
        }
        if i > 0 and args[i - 1] in valued:
            return args[i - 1], args[i]
        return f"argument '{clean(args[i])}'", args[i]


app = typer.Typer(
    name="caa",
    help="Contrastive Activation Addition: steering vectors from contrastive pairs, evaluated and applied.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    cls=_CheckedGroup,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def escape(text: str, keep: str = "") -> str:
    """Text from data or the user, ready for a rich markup string: control characters (ANSI
    escapes, carriage returns, bells; line breaks too unless ``keep`` holds them) shown as escapes
    (caa.text.clean), and markup brackets escaped. Every message and table cell goes through it."""
    return escape_markup(clean(text, keep))


def _print_version(value: bool) -> None:
    if value:
        from caa import __version__

        out.print(f"caa {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
) -> None:
    """Contrastive Activation Addition: ingest -> extract -> compute-vectors -> sweep -> generate.

    Layer l is the output of decoder block l (0-based): the residual stream after block l, which is
    hidden_states[l + 1] in transformers' terms.
    """


def fail(e: CaaError) -> NoReturn:
    """The one place a domain error becomes a red message (one line) and exit code 2."""
    err.print(f"[bold red]error:[/] {escape(str(e))}")
    raise typer.Exit(2)


def _require(ok: bool, message: str) -> None:
    """An option check: ``message`` (naming the option and the rule) unless ``ok``."""
    if not ok:
        raise CaaError(message)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}")


ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace an existing output file that is not a caa file of the kind written (e.g. a dataset).",
    ),
]


def _check_outputs(
    inputs: list[Any], outputs: list[tuple[Path, Any]], force: bool, show: bool = True
) -> None:
    """Before any work: refuse outputs that would destroy an input or other data; warn of replacements."""
    from caa.artifacts import check_outputs

    try:
        notices = check_outputs(inputs, outputs, force)
    except CaaError as e:
        fail(e)
    for message in notices if show else []:
        warn(message)


def _provenance(ctx: typer.Context) -> dict[str, Any]:
    """The options a command was given, as its artifacts record them: every parsed parameter."""
    return dict(ctx.params)


def _model_file(model: str) -> Path | None:
    """--model as an input to protect, where it names a file (a .gguf)."""
    return Path(model) if Path(model).is_file() else None


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
    force: ForceOpt = False,
) -> None:
    """Read contrastive pairs into pairs.parquet, validated, with a stable train/test split.

    A/B files hold `question`, `answer_matching_behavior`, `answer_not_matching_behavior` (the paper's
    format); free-form files hold `prompt`, `positive`, `negative`. A pair keeps its split when other
    pairs are added; a pairs.parquet of caa ingest among the files keeps its behaviors, ids and splits.

    Example: [bold]caa ingest data/sycophancy.json data/sentiment.jsonl -o pairs.parquet[/]
    (or, with the built-in datasets, from any directory: [bold]caa ingest sycophancy sentiment[/])
    """
    from caa.artifacts import PAIRS

    files = _dataset_files(files)
    _check_outputs(list(files), [(out_path, PAIRS)], force)
    from caa.ingest import ingest as run_ingest
    from caa.ingest import parse_mapping, write_pairs

    options = _provenance(ctx)
    try:
        _require(0 <= seed < 2**63, f"--seed {seed}: must be at least 0 and below 2**63")  # as generate's
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
        table.add_row(escape(name), escape(formats[name]), str(counts["train"]), str(counts["test"]))
    out.print(table)
    if result.rejected:
        out.print(f"{len(result.rejected)} rows rejected (listed above)")
    out.print(f"wrote {escape(str(out_path))}")


def _dataset_files(files: list[Path]) -> list[Path]:
    """The inputs of `caa ingest`, a built-in dataset's file in place of its name (said on stderr)."""
    from caa.datasets import resolve_dataset

    resolved = []
    for arg in files:
        try:
            path, card = resolve_dataset(arg)
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
    from caa.datasets import cards, data_dir

    try:
        found = cards()
        where = data_dir()
    except CaaError as e:
        fail(e)
    sources = sorted({card.source for card in found})
    table = Table(
        Column("name", no_wrap=True),
        Column("format", no_wrap=True),
        Column("size", justify="right", no_wrap=True),
        Column("licence", no_wrap=True),
        *([Column("source", ratio=1)] if len(sources) > 1 else []),
        Column("behavior", ratio=2),
        title=f"built-in datasets and neutral texts, in {escape(str(where))}",
        box=box.SIMPLE_HEAD,
    )
    for card in found:
        source = [escape(card.source)] if len(sources) > 1 else []
        size = f"{card.count} {escape(card.unit)}"
        table.add_row(
            escape(card.name),
            escape(card.format),
            size,
            escape(card.licence),
            *source,
            escape(card.description),
        )
    out.print(table)
    if len(sources) == 1:
        out.print(f"source of every file: {escape(sources[0])}")


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Embedded alias (smollm2-135m, gemma3-270m), model directory, .gguf file or hub id.",
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


TruncateOpt = Annotated[
    bool,
    typer.Option(
        "--truncate",
        help="Cut the start of prompts longer than the model's context (else they are an error).",
    ),
]


def _before_load(
    model: str, chat_template: str, layers: str | None, position: str = "last"
) -> list[int] | None:
    """The option checks that need no model, run before it loads: --chat-template, --position and
    --layers (its range too where the model's config gives the layer count without loading it;
    then the layers, else None)."""
    from caa.extract import parse_layers
    from caa.models import config_num_layers
    from caa.prompts import POSITIONS, TEMPLATES

    templates = ", ".join(TEMPLATES)
    _require(chat_template in TEMPLATES, f"--chat-template '{chat_template}': use one of {templates}")
    _require(position in POSITIONS, f"--position '{position}': use one of {', '.join(POSITIONS)}")
    if layers is None:
        return None
    count = config_num_layers(model)
    chosen = parse_layers(layers, count)
    return chosen if count is not None else None


def _load(
    model: str,
    dtype: str,
    device_map: str | None,
    trust_remote_code: bool,
    device: Any = None,
    chat_template: str | None = None,
) -> LoadedModel:
    """Load a model quietly (transformers' own progress bars off), with a status line for slow steps;
    with ``chat_template`` auto, say once when the model has no template (prompts are plain text)."""
    from transformers.utils import logging as hf_logging

    from caa.models import load_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with err.status(f"loading {escape(model)}"):
        loaded = load_model(
            model,
            dtype=dtype,
            device=device,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            progress=lambda m: err.print(escape(m)),
        )
    if chat_template == "auto" and not loaded.has_chat_template:
        warn(f"{model} has no chat template: prompts are plain text (--chat-template auto)")
    return loaded


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

    from caa.artifacts import ACTIVATIONS
    from caa.checkpoint import check_fresh
    from caa.extract import read_pairs, run_extract, select_pairs

    accelerator = Accelerator()
    _check_outputs([pairs, _model_file(model)], [(out_path, ACTIVATIONS)], force, accelerator.is_main_process)
    try:
        check_fresh(out_path, resume)  # OUT.partial/: an interrupted run, or a file in its way
    except CaaError as e:
        fail(e)
    if batch_size < 1:
        fail(CaaError(f"--batch-size {batch_size}: must be at least 1"))
    options = _provenance(ctx)
    try:
        frame = select_pairs(read_pairs(pairs)[0], pairs, split, behavior)  # fail fast, before the model
        _before_load(model, chat_template, layers, position)
        loaded = _load(
            model,
            dtype,
            device_map,
            trust_remote_code,
            device=None if device_map else accelerator.device,
            chat_template=chat_template,
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
                resume=resume,
                truncate=truncate,
                options=options,
                on_texts=advance,
                notice=warn,
                accelerator=accelerator,
            )
    except CaaError as e:
        fail(e)
    except KeyboardInterrupt:
        from caa.checkpoint import partial_dir

        if accelerator.is_main_process:
            kept = escape(str(partial_dir(out_path)))
            err.print(
                f"[yellow]interrupted:[/] the finished batches are kept in {kept}; "
                "run the same command with --resume to continue"
            )
        raise typer.Exit(130) from None
    if accelerator.is_main_process:
        out.print(f"recorded {n} pairs x 2 sides at {escape(layers)} layers -> wrote {escape(str(out_path))}")


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
    from caa.artifacts import VECTORS
    from caa.vectors import compute_vectors, read_activations, write_vectors

    _check_outputs(list(activations), [(out_path, VECTORS)], force)
    try:
        acts = read_activations(activations)
        frame = compute_vectors(acts, method)
        write_vectors(frame, out_path, acts, _provenance(ctx))
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
    out.print(f"wrote {escape(str(out_path))}")


ScaleOpt = Annotated[
    str,
    typer.Option(
        "--scale",
        help="What a multiplier multiplies. raw (the paper's): the vector as computed; residual: its "
        "direction at the layer's mean residual-stream norm, so x0.5 is half a typical residual at any "
        "layer and in any model.",
    ),
]
SteerOpt = Annotated[
    str,
    typer.Option(
        "--steer-positions",
        help="Which positions are steered. answer (the paper's): every position after the prompt, so "
        "the answer and every generated token, but not the prompt's last token; prompt-end: that last "
        "prompt token too, so the first generated token is steered as well; all: every position, "
        "prompt included (llama.cpp's control vectors).",
    ),
]


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
    from caa.artifacts import GENERATIONS
    from caa.generate import check_sampling, gather_prompts, run_generate
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
            gens = run_generate(
                loaded,
                vecs,
                behavior,
                layer,
                texts,
                mults,
                chat_template=chat_template,
                positions=steer_positions,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                labels=labels,
                scale=scale,
                options=options,
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
    from caa.artifacts import REPORT
    from caa.report import build_report, find_artifacts, write_report

    try:
        _require(max_prompts >= 1, f"--max-prompts {max_prompts}: must be at least 1")
        run = find_artifacts(paths)
    except CaaError as e:
        fail(e)
    _check_outputs([f.path for f in run.files], [(out_path, REPORT)], force)
    try:
        page = build_report(run, check_inputs=check_inputs, max_prompts=max_prompts, title=_title(paths))
        write_report(page, out_path)
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
        Path, typer.Option("--out", "-o", help="Output file: .gguf, .safetensors, .npy or .npz.")
    ],
    format_: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="gguf (a llama.cpp control vector), safetensors, npy (one layer) or npz "
            "(default: the output's suffix).",
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
    multiplier: Annotated[float, typer.Option(help="Bake this strength into the exported vectors.")] = 1.0,
    scale: ScaleOpt = "raw",
    force: ForceOpt = False,
) -> None:
    """Write one behavior's vectors for other tools: a llama.cpp control vector, safetensors, .npy or .npz.

    gguf: one F32 tensor direction.N per layer N. llama.cpp adds direction.N to the output of decoder
    block N at every position, prompt included: caa's layer N under --steer-positions all, no shift.
    It has no direction.0, so layer 0 is refused. Apply it with
    llama-cli -m model.gguf --control-vector-scaled happy.gguf:2.0 --control-vector-layer-range 8 20.
    safetensors: tensors layer.N, with the model fingerprint and the layer convention in the metadata;
    npz: arrays layer_N; npy: one layer's vector (d_model values).

    Example: [bold]caa export vectors.parquet --format gguf --layers 8-20 -o happy.gguf[/]
    """
    from caa.artifacts import EXPORT
    from caa.extract import parse_layers
    from caa.inspection import layer_spans
    from caa.interchange import export_format, export_vectors
    from caa.vectors import read_vectors

    _check_outputs([vectors], [(out_path, EXPORT)], force)
    try:
        fmt = export_format(format_, out_path)
        vecs = read_vectors(vectors)
        count = (vecs.meta.get("model") or {}).get("num_layers") or int(vecs.frame.layer.max()) + 1
        chosen = parse_layers(layers, count) if layers not in (None, "all") else None
        done = export_vectors(
            vecs, out_path, fmt, behavior=behavior, layers=chosen, multiplier=multiplier, scale=scale
        )
    except CaaError as e:
        fail(e)
    out.print(
        f"wrote {escape(str(out_path))}: {done.format}, '{escape(done.behavior)}' at layers "
        f"{layer_spans(done.layers)}, x{done.multiplier:g}"
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
    from caa.artifacts import VECTORS
    from caa.inspection import layer_spans
    from caa.interchange import check_layers, import_vectors, read_foreign
    from caa.models import config_num_layers

    _check_outputs([source, _model_file(model)], [(out_path, VECTORS)], force)
    options = {
        "source": str(source),
        "model": model,
        "behavior": behavior,
        "layer": layer,
        "feature": feature,
        "dtype": dtype,
    }
    try:
        _require(behavior is None or behavior.strip() != "", "--behavior must not be empty")
        foreign = read_foreign(source, layer=layer, feature=feature)
        check_layers(foreign, config_num_layers(model), model)  # before the model loads, where it can
        loaded = _load(model, dtype, None, trust_remote_code)
        vecs = import_vectors(foreign, loaded.fingerprint.to_dict(), behavior, options)
        vecs.save(out_path)
    except CaaError as e:
        fail(e)
    out.print(
        f"imported '{escape(vecs.behaviors()[0])}' at layers {layer_spans(list(foreign.vectors))} from "
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

    from caa.inspection import inspect_artifact

    try:
        report = inspect_artifact(file, check_inputs=check_inputs)
    except CaaError as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    out.print(
        f"[bold]{escape(str(file))}[/]: {report.kind}, {_size(report.size_bytes)}, "
        f"{report.rows} rows in {report.row_groups} row group(s)"
    )
    meta = report.meta
    shown = ("kind", "command", "schema_version", "caa_version", "created", "options", "model", "prompt")
    info = _key_value_table("metadata")
    for key in shown:
        if meta.get(key) is not None:
            info.add_row(key, _shown(key, meta[key]))
    for key, value in meta.items():
        if key not in (*shown, "inputs"):
            brief = (
                f"{len(value)} items: {', '.join(map(str, value[:4]))}, ..."
                if isinstance(value, list) and len(value) > 8
                else json.dumps(value)
            )  # e.g. the thousands of train_pair_ids of a vectors file
            info.add_row(escape(key), escape(brief))
    out.print(info)
    if report.inputs:
        inputs = Table(
            "input", "sha256", "status", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title="inputs"
        )
        colour = {"unchanged": "green", "changed": "yellow", "missing": "yellow", "unchecked": "dim"}
        for i in report.inputs:
            shade = colour.get(i.status, "yellow")  # special files and unreadable ones: not hashed
            inputs.add_row(escape(i.path), escape(str(i.sha256)[:12]), f"[{shade}]{i.message}[/]")
        out.print(inputs)
    summary = _key_value_table(f"{report.kind} summary")
    for key, value in report.summary.items():
        summary.add_row(key, _shown(key, value))
    out.print(summary)
    if report.breakdown:
        names = list(report.breakdown[0])
        headers = [n.replace("_", " ") for n in names]  # lets a narrow terminal wrap the headers
        rows = Table(
            Column(headers[0], no_wrap=True),
            *headers[1:],
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
        )
        for row in report.breakdown:
            rows.add_row(*[_shown(k, row[k]) for k in names])
        out.print(rows)
    for i in report.inputs:
        if i.status not in ("unchanged", "unchecked"):
            out.print(f"[yellow]note:[/] input {escape(i.path)} {i.message}")


def _key_value_table(title: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_header=False, show_edge=False, pad_edge=False, title=title)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    return table


def _shown(key: str, value: Any, inline: bool = False) -> str:
    """One metadata or summary value as table text: layers as spans, ranges as a..b, dicts as lines."""
    from caa.inspection import layer_spans

    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, dict):
        sep, join = ("=", ", ") if inline else (": ", "\n")
        return join.join(f"{escape(str(k))}{sep}{_shown(str(k), v, True)}" for k, v in value.items())
    if isinstance(value, list) and key.endswith("layers") and all(isinstance(v, int) for v in value):
        return layer_spans(value)
    if isinstance(value, list) and key.endswith("_range") and len(value) == 2:
        return f"{_shown(key, value[0])} .. {_shown(key, value[1])}"
    if isinstance(value, list):
        return ", ".join(_shown(key, v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
