"""What every command shares: the app, the consoles, errors and warnings, option types, loading a
model quietly, progress bars, and the checks that run before any work."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape as escape_markup
from typer.core import TyperGroup

from caa import api
from caa.api import CaaError, LoadedModel, OptionError, clean, text_problem

Options = TypeVar("Options")


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
    (caa.store.text.clean), and markup brackets escaped. Every message and table cell goes through it."""
    return escape_markup(clean(text, keep))


def _print_version(value: bool) -> None:
    if value:
        import caa

        out.print(f"caa {caa.__version__}")
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
    """The one place a domain error becomes a red message (one line) and exit code 2. An option the
    library refused is named by its flag, with the value as it was typed (``--layers '4-40'``)."""
    message = str(e)
    if isinstance(e, OptionError):
        message = f"{_flag(e.option)}: {e.problem}"
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


def _flag(option: str) -> str:
    """The flag of the running command's parameter ``option`` and its value as typed, e.g.
    ``--batch-size 0`` or ``--layers '4-40'`` (a parameter's name is its options field's)."""
    ctx = typer.main.get_current_context(silent=True)  # the running command's (typer's own click)
    if ctx is None:
        return f"--{option.replace('_', '-')}"
    for param in ctx.command.params:
        if param.name == option and param.opts and param.opts[0].startswith("-"):
            flag = max(param.opts, key=len)
            value = ctx.params.get(option)
            if value is None or isinstance(value, (list, tuple)):
                return flag
            return f"{flag} '{value}'" if isinstance(value, str) else f"{flag} {value}"
    return f"--{option.replace('_', '-')}"


def stage_options(kind: type[Options], ctx: typer.Context, **parsed: Any) -> Options:
    """A stage's options from the command's parameters of the same names; ``parsed`` gives the values
    the command typed as text and parsed (layers, multipliers, sizes). Every field must be found:
    tests/stages/test_options.py checks each command against its stage's options."""
    values = {**ctx.params, **parsed}
    missing = [f.name for f in fields(kind) if f.name not in values]  # type: ignore[arg-type]
    if missing:
        raise RuntimeError(f"{ctx.command.name}: no parameter for option(s) {', '.join(missing)}")
    try:
        return kind(**{f.name: values[f.name] for f in fields(kind)})  # type: ignore[arg-type]
    except CaaError as e:
        fail(e)


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
    inputs: list[Any],
    outputs: list[tuple[Path, Any]],
    force: bool,
    show: bool = True,
    directories: tuple[Path, ...] = (),
) -> None:
    """Before any work: refuse outputs that would destroy an input or other data, or that cannot be
    written; warn of replacements."""
    try:
        notices = api.check_outputs(inputs, outputs, force, directories)
    except CaaError as e:
        fail(e)
    for message in notices if show else []:
        warn(message)


def _provenance(ctx: typer.Context) -> dict[str, Any]:
    """The options a command was given, as its artifacts record them: every parsed parameter."""
    return dict(ctx.params)


def _model_input(model: str) -> Path | None:
    """--model as an input to protect, where it names a file (a .gguf) or a directory (its weights)."""
    return Path(model) if os.path.exists(model) else None


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


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a block that makes many long-lived objects and
    little garbage (imports, loading a model, a plot): the collector would scan them over and over,
    about a second of a run. Afterwards every object alive is moved out of its reach (``gc.freeze``:
    the command's modules and model live until the process ends), else the next collections would
    still scan them, a few tenths of a second. The collector is left on or off as it was."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


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
    with _gc_paused():  # transformers' imports and the model's modules: long-lived objects
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        with err.status(f"loading {escape(model)}"):
            loaded = api.load_model(
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


def _accelerator() -> Any:
    """This process's ``accelerate.Accelerator``; under a launcher of several processes every rank
    reports itself, and the main process says which ranks share the work."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    accelerator = Accelerator()
    if accelerator.num_processes > 1:
        ranks = gather_object([accelerator.process_index])
        if accelerator.is_main_process:
            err.print(f"{len(ranks)} processes share the work: ranks {', '.join(map(str, ranks))}")
    return accelerator


def _device(accelerator: Any, device_map: str | None) -> Any:
    """Where this process puts the model: ``--device-map`` places it, else the accelerator's device."""
    return None if device_map else accelerator.device


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
