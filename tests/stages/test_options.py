"""Every command builds its stage's options from its parameters by name (caa.cli.common.stage_options):
these tests pin each command's parameters to the fields of its options, so a field renamed on one side
fails here instead of silently falling back to its default."""

from __future__ import annotations

from dataclasses import fields

import pytest
import typer
from typer.main import get_command

import caa
from caa.cli import app

# What each command takes besides its stage's options: its inputs and outputs, the model and how
# it is loaded, and how the run goes (resume, force).
COMMANDS = {
    "ingest": (caa.IngestOptions, {"files", "out_path", "force"}),
    "extract": (
        caa.ExtractOptions,
        {"pairs", "out_path", "model", "resume", "force", "dtype", "device_map", "trust_remote_code"},
    ),
    "sweep": (
        caa.SweepOptions,
        {
            "vectors",
            "pairs",
            "out_path",
            "model",
            "neutral",
            "force",
            "dtype",
            "device_map",
            "trust_remote_code",
        },
    ),
    "generate": (
        caa.GenerateOptions,
        {
            "vectors",
            "prompt",
            "prompts_file",
            "limit",
            "out_path",
            "model",
            "force",
            "dtype",
            "device_map",
            "trust_remote_code",
        },
    ),
}


def _params(name: str) -> set[str]:
    group = get_command(app)
    command = group.commands[name]  # type: ignore[attr-defined]
    return {p.name for p in command.params if p.name}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_of_a_stage_is_a_parameter_of_its_command(name: str) -> None:
    kind, others = COMMANDS[name]
    params = _params(name)
    options = {f.name for f in fields(kind)}
    assert options <= params, f"no parameter for {sorted(options - params)}"
    assert params - options == others, "parameters that reach no option: " + str(
        sorted(params - options - others)
    )


def test_a_missing_parameter_is_a_programming_error_not_a_default() -> None:
    from caa.cli.common import stage_options

    command = typer.main.get_command(app).commands["sweep"]  # type: ignore[attr-defined]
    ctx = typer.Context(command)
    ctx.params = {f.name: getattr(caa.SweepOptions(), f.name) for f in fields(caa.SweepOptions)}
    assert stage_options(caa.SweepOptions, ctx) == caa.SweepOptions()
    del ctx.params["max_kl"]
    with pytest.raises(RuntimeError, match="no parameter for option"):
        stage_options(caa.SweepOptions, ctx)


def test_options_record_themselves_as_json_values() -> None:
    options = caa.SweepOptions(layers=[3, 1, 1], multipliers=[2, -1])  # type: ignore[arg-type]
    assert options.layers == (1, 3) and options.multipliers == (-1.0, 0.0, 2.0)
    recorded = options.provenance()
    assert recorded["layers"] == [1, 3] and recorded["multipliers"] == [-1.0, 0.0, 2.0]
    assert recorded["max_kl"] == 0.5 and recorded["engine"] == "fast"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: caa.SweepOptions(behaviors="sent"),
            "behaviors='sent': must be a list of names, not one string",
        ),
        (lambda: caa.SweepOptions(multipliers=[float("nan")]), "nan is not finite"),
        (lambda: caa.SweepOptions(engine="turbo"), "engine='turbo': use one of fast, naive"),
        (lambda: caa.ExtractOptions(layers=[3.7]), "3.7 is not a layer"),
        (lambda: caa.ExtractOptions(batch_size=0), "batch_size=0: must be at least 1"),
        (lambda: caa.GenerateOptions(layer=2, multipliers=[]), "must name at least one multiplier"),
        (lambda: caa.GenerateOptions(layer=2, temperature=1e-9), "temperature=1e-09: must be 0 (greedy)"),
        (lambda: caa.IngestOptions(seed=-1), "seed=-1: must be at least 0 and below 2**63"),
    ],
)
def test_options_refuse_what_cannot_work_naming_the_parameter(make: object, message: str) -> None:
    with pytest.raises(caa.CaaError) as caught:
        make()  # type: ignore[operator]
    assert message in str(caught.value)


def test_the_command_line_names_the_flag_and_the_value_as_typed(tmp_path: object) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["sweep", "v.parquet", "p.parquet", "--engine", "turbo"])
    assert result.exit_code == 2
    assert "--engine 'turbo': use one of fast, naive" in result.output
