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


def _require(ok: bool, message: str) -> None:
    """An option check: ``message`` (naming the option and the rule) unless ``ok``."""
    if not ok:
        raise CaaError(message)


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


TruncateOpt = Annotated[
    bool,
    typer.Option(
        "--truncate",
        help="Cut the start of prompts longer than the model's context (else they are an error).",
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
    truncate: TruncateOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run from its finished batches (kept in OUT.partial/); "
            "the inputs and options must be the same.",
        ),
    ] = False,
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
        "truncate": truncate,
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


NEUTRAL_DEFAULT = Path("data/neutral_text.jsonl")


@app.command()
def sweep(
    vectors: Annotated[Path, typer.Argument(help="vectors.parquet from `caa compute-vectors`.")],
    pairs: Annotated[Path, typer.Argument(help="pairs.parquet from `caa ingest`; its test split is scored.")],
    out_path: Annotated[
        Path, typer.Option("--out", "-o", help="Output table; the plot goes beside it (.png).")
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
        Path, typer.Option(help='Neutral texts (.jsonl of {"text"} or .txt) for the fluency cost.')
    ] = NEUTRAL_DEFAULT,
    neutral_count: Annotated[int, typer.Option(help="How many neutral texts to use.")] = 16,
    max_kl: Annotated[
        float, typer.Option(help="Fluency budget for the recommendation: mean KL per token.")
    ] = 0.5,
    steer_positions: Annotated[
        str, typer.Option(help="answer: from the end of the prompt on (the paper's); all: every position.")
    ] = "answer",
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
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Evaluate steering per layer x multiplier on held-out pairs, with its fluency cost.

    Score per A/B question: p(matching letter) / (p(A) + p(B)) at the answer position (the paper's);
    per free-form pair: log p(positive) - log p(negative). The fluency cost is the mean KL divergence
    from the unsteered to the steered next-token distribution over neutral text, and the perplexity
    change. Prints the table and the recommended (layer, multiplier): the largest gain whose KL stays
    under --max-kl. Writes the table and a plot.

    Example: [bold]caa sweep vectors.parquet pairs.parquet --layers 10,14,18 --multipliers -4,-2,0,2,4[/]
    """
    from caa.budget import parse_size, planner_for
    from caa.extract import parse_layers, read_pairs, select_pairs
    from caa.sweep import parse_multipliers, plot_sweep, read_neutral, run_sweep, write_sweep
    from caa.vectors import read_vectors

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
        mults = parse_multipliers(multipliers)
        vecs = read_vectors(vectors)
        frame = read_pairs(pairs)[0]
        names = behavior or sorted(set(vecs.behaviors()) & set(frame.behavior))
        if not names:
            raise CaaError(f"{vectors} and {pairs} have no behavior in common")
        for name in names:
            vecs.require(name)
        test = select_pairs(frame, pairs, "test", names)
        if max_pairs is not None:
            test = test.groupby("behavior", sort=False).head(max_pairs).reset_index(drop=True)
        texts = read_neutral(neutral, neutral_count)
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
                engine=engine,
                truncate=truncate,
                pairs_path=pairs,
                tick=tick,
                notice=warn,
            )
        write_sweep(result, out_path, options, {"vectors": vectors, "pairs": pairs}, loaded, vecs)
        plot = out_path.with_suffix(".png")
        plot_sweep(result, plot, max_kl)
    except CaaError as e:
        fail(e)
    _print_sweep(result, max_kl)
    out.print(f"wrote {escape(str(out_path))} and {escape(str(plot))}")


def _print_sweep(result: Any, max_kl: float) -> None:
    for name, part in result.table.groupby("behavior", sort=False):
        kind = "p(match)" if part.score_kind.iloc[0] == "p_match" else "logp(pos)-logp(neg)"
        table = Table(
            "layer",
            "mult",
            kind,
            "± sem",
            "delta",
            "KL",
            "ppl",
            "Δppl",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            title=f"{name} (n={part.n.iloc[0]} held-out pairs)",
        )
        for r in part.itertuples():
            table.add_row(
                str(r.layer),
                f"{r.multiplier:g}",
                f"{r.score_mean:.3f}",
                f"{r.score_sem:.3f}",
                f"{r.delta:+.3f}",
                f"{r.kl_mean:.3f}",
                f"{r.perplexity:.2f}",
                f"{r.perplexity_delta:+.2f}",
            )
        out.print(table)
        pick = result.recommended.get(name)
        if pick:
            out.print(
                f"[bold]recommended for {escape(name)}: layer {pick[0]}, multiplier {pick[1]:g}[/] "
                f"(largest gain with KL <= {max_kl:g})"
            )
        else:
            out.print(f"no (layer, multiplier) raises the {escape(name)} score with KL <= {max_kl:g}")


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
    temperature: Annotated[float, typer.Option(help="0: greedy; above 0: sampling.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling (with --temperature).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    steer_positions: Annotated[
        str,
        typer.Option(
            help="answer: the last prompt token and every generated token (the paper's); all: the prompt too."
        ),
    ] = "answer",
    chat_template: TemplateOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Generate with steering, every prompt under every multiplier in one batch, side by side.

    Example: [bold]caa generate -v vectors.parquet --behavior sentiment --layer 14 --multipliers -4,0,4
    -p "Describe your morning."[/]
    """
    from caa.generate import read_prompts, run_generate, write_generations
    from caa.sweep import STEER_POSITIONS, parse_multipliers
    from caa.vectors import read_vectors

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
        _require(temperature >= 0, f"--temperature {temperature}: must be 0 (greedy) or above")
        _require(0 < top_p <= 1, f"--top-p {top_p}: must be above 0 and at most 1")
        mults = parse_multipliers(multipliers, include_zero=False)
        if steer_positions not in STEER_POSITIONS:
            raise CaaError(f"--steer-positions '{steer_positions}': use one of {', '.join(STEER_POSITIONS)}")
        from_file = read_prompts(prompts_file)[:limit] if prompts_file else []
        texts = list(prompt or []) + from_file
        labels = [f"--prompt {i}" for i in range(1, len(prompt or []) + 1)]
        labels += [f"{prompts_file}: prompt {i}" for i in range(1, len(from_file) + 1)]
        if not texts:
            raise CaaError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
        vecs = read_vectors(vectors)
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
                steer_all=steer_positions == "all",
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
    title = f"{frame.behavior.iloc[0]} at layer {layer}"
    table = Table("prompt", *[f"x{m:g}" for m in mults], title=title, show_lines=True)
    for _, group in frame.groupby("prompt_index", sort=True):
        table.add_row(
            escape(group.prompt.iloc[0]), *[escape(t) for t in group.sort_values("multiplier").text]
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
            info.add_row(key, escape(brief))
    out.print(info)
    if report.inputs:
        inputs = Table(
            "input", "sha256", "status", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title="inputs"
        )
        colour = {"unchanged": "green", "changed": "yellow", "missing": "yellow", "unchecked": "dim"}
        for i in report.inputs:
            inputs.add_row(escape(i.path), i.sha256[:12], f"[{colour[i.status]}]{i.message}[/]")
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
        if i.status in ("changed", "missing"):
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
