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


def _model_file(model: str) -> Path | None:
    """--model as an input to protect, where it names a file (a .gguf)."""
    return Path(model) if Path(model).is_file() else None


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
    force: ForceOpt = False,
) -> None:
    """Read contrastive pairs into pairs.parquet, validated, with a stable train/test split.

    A/B files hold `question`, `answer_matching_behavior`, `answer_not_matching_behavior` (the paper's
    format); free-form files hold `prompt`, `positive`, `negative`. A pair keeps its split when other
    pairs are added; a pairs.parquet of caa ingest among the files keeps its behaviors, ids and splits.

    Example: [bold]caa ingest data/sycophancy.json data/sentiment.jsonl -o pairs.parquet[/]
    """
    from caa.artifacts import PAIRS

    _check_outputs(list(files), [(out_path, PAIRS)], force)
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
    options = {
        "pairs": str(pairs),
        "model": model,
        "layers": layers,
        "split": split,
        "behavior": behavior or [],
        "position": position,
        "chat_template": chat_template,
        "batch_size": batch_size,
        "truncate": truncate,
        "dtype": dtype,
        "device_map": device_map,
    }
    try:
        frame = select_pairs(read_pairs(pairs)[0], pairs, split, behavior)  # fail fast, before the model
        _before_load(model, chat_template, layers, position)
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
        "cons",
        "acc",
        "AUC",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title=f"{method} vectors (|h|: mean residual norm; v/h: |v| / |h|; "
        "cos±1: with the adjacent layers' vectors; cons: mean cosine of the training pairs' differences "
        "with their mean; acc, AUC: separability on the test split)",
    )

    def num(x: object, fmt: str = "{:.3f}") -> str:
        return "-" if x is None or x != x else fmt.format(x)

    for r in frame.itertuples():
        table.add_row(
            escape(r.behavior),
            str(r.layer),
            str(r.n_train),
            num(r.vector_norm, "{:.2f}"),
            num(r.mean_residual_norm, "{:.1f}"),
            num(r.vector_norm / r.mean_residual_norm),
            num(r.cos_prev_layer),
            num(r.cos_next_layer),
            num(r.pair_consistency),
            num(r.test_accuracy),
            num(r.test_auc),
        )
    out.print(table)
    out.print(f"wrote {escape(str(out_path))}")


NEUTRAL_TEXT = Path("data/neutral_text.jsonl")
NEUTRAL_PROMPTS = Path("data/neutral_prompts.txt")
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
    vectors: Annotated[Path, typer.Argument(help="vectors.parquet from `caa compute-vectors`.")],
    pairs: Annotated[Path, typer.Argument(help="pairs.parquet from `caa ingest`; its test split is scored.")],
    out_path: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output table; the plot goes beside it as STEM.png (STEM.plot.png when OUT is a .png).",
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
            '(.jsonl of {"text"}) read at every position. Default: data/neutral_prompts.txt, '
            "or data/neutral_text.jsonl with all."
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
    from caa.artifacts import PLOT, SWEEP, SWEEP_ITEMS, atomic_paths, sweep_paths
    from caa.budget import parse_size, planner_for
    from caa.extract import parse_layers, read_pairs, select_pairs
    from caa.hooks import steer_start
    from caa.sweep import parse_multipliers, plot_sweep, read_neutral, run_sweep, write_sweep
    from caa.vectors import read_vectors

    try:
        table_path, items_path, plot = sweep_paths(out_path)
    except CaaError as e:
        fail(e)
    if neutral is None:
        neutral = NEUTRAL_TEXT if steer_positions == "all" else NEUTRAL_PROMPTS
    inputs = [vectors, pairs, neutral, _model_file(model)]
    _check_outputs(inputs, [(table_path, SWEEP), (items_path, SWEEP_ITEMS), (plot, PLOT)], force)

    options = {
        "vectors": str(vectors),
        "pairs": str(pairs),
        "model": model,
        "behavior": behavior or [],
        "layers": layers,
        "multipliers": multipliers,
        "max_pairs": max_pairs,
        "neutral": str(neutral),
        "neutral_count": neutral_count,
        "max_kl": max_kl,
        "max_anti": max_anti,
        "seed": seed,
        "steer_positions": steer_positions,
        "engine": engine,
        "truncate": truncate,
        "chat_template": chat_template,
        "max_memory": max_memory,
        "batch_size": batch_size,
        "dtype": dtype,
    }
    try:
        budget = parse_size(max_memory) if max_memory is not None else None
        _require(batch_size is None or batch_size >= 1, f"--batch-size {batch_size}: must be at least 1")
        _require(max_pairs is None or max_pairs >= 1, f"--max-pairs {max_pairs}: must be at least 1")
        _require(neutral_count >= 1, f"--neutral-count {neutral_count}: must be at least 1")
        _require(max_kl >= 0, f"--max-kl {max_kl}: must be 0 or above")
        _require(max_anti is None or 0 <= max_anti <= 1, f"--max-anti {max_anti}: must be between 0 and 1")
        _require(0 <= seed < 2**32, f"--seed {seed}: must be between 0 and 2**32 - 1")
        steer_start(steer_positions, 0)  # an unknown policy is refused before the model loads
        mults = parse_multipliers(multipliers)
        vecs = read_vectors(vectors)
        frame = read_pairs(pairs)[0]
        names = behavior or sorted(set(vecs.behaviors()) & set(frame.behavior))
        if not names:
            raise CaaError(f"{vectors} and {pairs} have no behavior in common")
        early = _before_load(model, chat_template, layers)  # --layers against the model's config
        for name in names:
            vecs.require(name, early)
        for line in vecs.absurd_norms(names):
            warn(line)
        test = select_pairs(frame, pairs, "test", names)
        if max_pairs is not None:
            test = test.groupby("behavior", sort=False).head(max_pairs).reset_index(drop=True)
        texts = read_neutral(neutral, neutral_count, steer_positions)
        loaded = _load(model, dtype, device_map, trust_remote_code)
        chosen = parse_layers(layers, loaded.num_layers) if layers else None
        total = 0  # texts scored per layer (a free-form pair is two texts), neutral texts included
        for name in names:
            part = test[test.behavior == name]
            per_layer = len(part) * (1 if (part.format == "ab").all() else 2) + len(texts)
            total += per_layer * len(vecs.require(name, chosen))
        with _progress() as bar:  # type: ignore[attr-defined]
            task = bar.add_task("sweeping", total=total, rate="")

            def tick(n: int) -> None:
                bar.advance(task, n)

            result = run_sweep(
                loaded,
                vecs,
                test,
                texts,
                behaviors=names,
                layers=chosen,
                multipliers=mults,
                chat_template=chat_template,
                steer_positions=steer_positions,
                planner=planner_for(loaded, budget, batch_size),
                max_kl=max_kl,
                max_anti=max_anti,
                engine=engine,
                truncate=truncate,
                seed=seed,
                pairs_path=pairs,
                neutral_source=str(neutral),
                tick=tick,
                notice=warn,
            )
        inputs_used = {"vectors": vectors, "pairs": pairs, "neutral": neutral}
        with atomic_paths([table_path, items_path, plot]) as (table_tmp, items_tmp, plot_tmp):  # all or none
            write_sweep(result, table_tmp, items_tmp, options, inputs_used, loaded, vecs)
            plot_sweep(result, plot_tmp, max_kl)
    except CaaError as e:
        fail(e)
    _print_sweep(result, max_kl, max_anti)
    out.print(f"wrote {escape(str(table_path))}, {escape(str(items_path))} and {escape(str(plot))}")


def _print_sweep(result: Any, max_kl: float, max_anti: float | None) -> None:
    from caa.sweep import fluency_label

    def num(x: float, fmt: str) -> str:
        return "-" if x != x else fmt.format(x)

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
            f"delta's paired 95% CI; KL {fluency_label(result.fluency)}",
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


MIN_TEMPERATURE = 1e-3  # logits / 1e-300 overflow to inf and the sampling probabilities to NaN


@app.command()
def generate(
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
    from caa.generate import read_prompts, run_generate, write_generations
    from caa.hooks import steer_start
    from caa.sweep import parse_multipliers
    from caa.vectors import read_vectors

    _check_outputs([vectors, prompts_file, _model_file(model)], [(out_path, GENERATIONS)], force)

    options = {
        "vectors": str(vectors),
        "layer": layer,
        "behavior": behavior,
        "multipliers": multipliers,
        "prompts": str(prompts_file) if prompts_file else None,
        "model": model,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "steer_positions": steer_positions,
        "chat_template": chat_template,
        "dtype": dtype,
    }
    try:
        _require(limit is None or limit >= 1, f"--limit {limit}: must be at least 1")
        _require(max_new_tokens >= 1, f"--max-new-tokens {max_new_tokens}: must be at least 1")
        _require(
            temperature == 0 or MIN_TEMPERATURE <= temperature < float("inf"),
            f"--temperature {temperature}: must be 0 (greedy) or a finite number from {MIN_TEMPERATURE} "
            "(below, the logits divided by it overflow and sampling breaks)",
        )
        _require(0 < top_p <= 1, f"--top-p {top_p}: must be above 0 and at most 1")
        _require(0 <= seed < 2**63, f"--seed {seed}: must be at least 0 and below 2**63")
        mults = parse_multipliers(multipliers, include_zero=False)
        steer_start(steer_positions, 0)  # an unknown policy is refused before the model loads
        from_file = read_prompts(prompts_file)[:limit] if prompts_file else []
        texts = list(prompt or []) + from_file
        labels = [f"--prompt {i}" for i in range(1, len(prompt or []) + 1)]
        labels += [f"{prompts_file}: prompt {i}" for i in range(1, len(from_file) + 1)]
        if not texts:
            raise CaaError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
        vecs = read_vectors(vectors)
        picked = vecs.pick(behavior)
        vecs.require(picked, [layer])  # the vectors and options are checked before the model loads
        for line in vecs.absurd_norms([picked], [layer]):
            warn(line)
        _before_load(model, chat_template, None)
        loaded = _load(model, dtype, device_map, trust_remote_code)
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
            )
        inputs = {"vectors": vectors, **({"prompts": prompts_file} if prompts_file else {})}
        write_generations(gens, out_path, options, inputs, loaded)
    except CaaError as e:
        fail(e)
    frame = gens.frame
    title = f"{escape(frame.behavior.iloc[0])} at layer {layer}"
    table = Table("prompt", *[f"x{m:g}" for m in mults], title=title, show_lines=True)
    for _, group in frame.groupby("prompt_index", sort=True):
        table.add_row(
            escape(group.prompt.iloc[0], "\n"),
            *[escape(t, "\n") for t in group.sort_values("multiplier").text],
        )
    out.print(table)
    out.print(f"wrote {escape(str(out_path))}")


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

    from caa.inspect import inspect_artifact

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
    from caa.inspect import layer_spans

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
