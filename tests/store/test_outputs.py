"""Outputs never destroy data: an output that is an input, outputs that collide, a multi-file output
half written, temporaries shared by concurrent writers, a piece lost on disk before --resume.

The CLI cases run the real commands (typer's CliRunner on ``caa.cli.app``) on copies of the valid
artifacts that ``tests/test_bad_inputs.py`` makes once per session on the tiny llama model, so a
check that failed to refuse could only destroy a copy. Each bad case ends in exit code 2 with one
line naming the file, leaves every file as it was and no output or temporary behind; the cases are
listed in tests/bad_inputs/README.md ("Outputs that would destroy data").
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from caa.cli import app
from caa.errors import CaaError
from caa.models.loading import load_model
from caa.stages.extract_file import run_extract
from caa.stages.ingest import read_pairs
from caa.stages.options import ExtractOptions
from caa.store.artifacts import columns_table, make_meta, read_artifact, read_meta, write_artifact
from caa.store.checkpoint import partial_dir
from caa.store.files import atomic_path, atomic_paths
from caa.store.outputs import check_outputs, sweep_paths
from caa.store.schemas import GENERATIONS, PAIRS, PLOT, PNG_SOFTWARE, SWEEP
from tests.helpers import FREEFORM_ROWS
from tests.stages.test_extract_file import Interrupt, many_pairs, table_of
from tests.test_bad_inputs import COMMANDS, Valid, _describe, _one_thread, valid

BY4 = ExtractOptions(layers=(0, 1, 2, 3), batch_size=4)  # every block of the tiny models
BY2 = ExtractOptions(layers=(1, 2), batch_size=2)

__all__ = ["_one_thread", "valid"]  # fixtures, shared with the bad-input corpus

runner = CliRunner()


# --- a private copy of every valid input --------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    """Copies of the valid inputs in one test's directory, and the tiny model (never an output)."""

    tmp: Path

    def subs(self, valid: Valid) -> dict[str, str]:
        return {
            "tmp": str(self.tmp),
            "model": str(valid.model),
            **{role: str(self.tmp / name) for role, name in NAMES.items()},
        }


NAMES = {
    "pairs": "pairs.parquet",
    "acts": "acts.parquet",
    "vectors": "vectors.parquet",
    "source": "mood.jsonl",
    "agree": "agree.jsonl",
    "neutral": "neutral.jsonl",
    "prompts": "prompts.txt",
}


def copies(valid: Valid, tmp: Path) -> Files:
    for role, name in NAMES.items():
        shutil.copy(valid.root / name if role == "agree" else getattr(valid, role), tmp / name)
    return Files(tmp)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry below ``root``: file bytes, a symlink's target, or 'dir'/'fifo'."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        elif path.is_file():
            found[key] = path.read_bytes()
        else:
            found[key] = "fifo"
    return found


HELD: list[BinaryIO] = []  # the locks of ``locked:`` setups


def setup(ops: str, tmp: Path, subs: dict[str, str]) -> None:
    """Make what a case needs: ``link:NAME=TARGET`` (a symlink), ``hard:NAME=TARGET`` (a hard link),
    ``dir:NAME``, ``text:NAME`` (a text file), ``png:NAME`` (a PNG from elsewhere), ``dataset:NAME``
    (a Parquet dataset without caa metadata), ``fifo:NAME``, ``copy:NAME=SOURCE``, ``locked:NAME``
    (a file locked as a running extract locks it, until the case ends); targets and
    sources are paths with ``{role}`` fields."""
    for op in ops.split():
        what, _, arg = op.partition(":")
        name, _, target = arg.partition("=")
        path, target = tmp / name, target.format(**subs)
        path.parent.mkdir(parents=True, exist_ok=True)
        if what == "link":
            path.symlink_to(target)
        elif what == "hard":
            os.link(target, path)
        elif what == "dir":
            path.mkdir()
        elif what == "text":
            path.write_text("my notes, not a caa file\n")
        elif what == "png":
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        elif what == "dataset":
            pq.write_table(pa.table({"prompt": ["a"], "positive": ["b"], "negative": ["c"]}), path)
        elif what == "fifo":
            os.mkfifo(path)
        elif what == "copy":
            shutil.copy(target, path)
        elif what == "tree":
            shutil.copytree(target, path)
        elif what == "locked":  # a run still going: its lock held (here by this process)
            held = path.open("a+b")
            fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            HELD.append(held)
        else:
            raise AssertionError(f"unknown setup {op!r}")


# --- bad outputs through the CLI -------------------------------------------------------------------------


@dataclass(frozen=True)
class OutCase:
    """One command line whose output would destroy data. ``args`` is a full command line with
    ``{role}`` fields (the copies in ``Files``, ``{model}``, ``{tmp}``); ``setup`` as in :func:`setup`;
    the one line of output must contain ``problem`` and ``names``."""

    id: str
    stage: str
    args: str
    setup: str
    problem: str
    names: str


INPUT = "is the input"
FORCE = "add --force to replace it"
INSIDE = "exists inside the input directory"
SWEEP_CMD = COMMANDS["sweep"].replace("{neutral}", "{tmp}/neutral.jsonl")
GENERATE_CMD = COMMANDS["generate"]
OUT_CASES = [
    OutCase(*row)
    for row in [
        # ingest: an output that is an input, through every kind of alias
        ("out-is-input-symlink", "ingest", "ingest {source} -o {tmp}/alias.jsonl",
         "link:alias.jsonl={source}", INPUT, "{tmp}/alias.jsonl"),
        ("out-is-input-dotdot", "ingest", "ingest {source} -o {tmp}/sub/../mood.jsonl", "dir:sub", INPUT,
         "{tmp}/sub/../mood.jsonl"),
        ("out-is-second-input-hardlink", "ingest", "ingest {agree} {source} -o {tmp}/hard.jsonl",
         "hard:hard.jsonl={source}", INPUT, "{source}"),
        ("out-is-directory", "ingest", "ingest {source} -o {tmp}/outdir", "dir:outdir", "is a directory",
         "{tmp}/outdir"),
        ("out-below-a-file", "ingest", "ingest {source} -o {tmp}/notes.txt/pairs.parquet", "text:notes.txt",
         "is a file, not a directory", "{tmp}/notes.txt"),
        ("out-is-a-dataset", "ingest", "ingest {source} -o {tmp}/dataset.parquet", "dataset:dataset.parquet",
         "a Parquet file that is not a caa artifact", "{tmp}/dataset.parquet"),
        ("out-is-a-text-file", "ingest", "ingest {source} -o {tmp}/notes.txt", "text:notes.txt",
         "a file that is not a caa artifact, not a 'pairs' file; " + FORCE, "{tmp}/notes.txt"),
        ("out-is-activations", "ingest", "ingest {source} -o {acts}", "",
         "is a 'activations' file from `caa extract`, not a 'pairs' file", "{acts}"),
        ("out-is-a-fifo", "ingest", "ingest {source} -o {tmp}/fifo", "fifo:fifo", "is not a regular file",
         "{tmp}/fifo"),
        # extract
        ("out-is-pairs", "extract", "extract {pairs} -m {model} -o {pairs}", "", INPUT, "{pairs}"),
        ("out-is-pairs-symlink", "extract", "extract {pairs} -m {model} -o {tmp}/link.parquet",
         "link:link.parquet={pairs}", INPUT, "{tmp}/link.parquet"),
        ("out-is-gguf-model", "extract", "extract {pairs} -m {tmp}/m.gguf -o {tmp}/m.gguf", "text:m.gguf",
         "is the input {tmp}/m.gguf", "{tmp}/m.gguf"),
        ("partial-is-a-file", "extract", "extract {pairs} -m {model} -o {tmp}/out.parquet",
         "text:out.parquet.partial", "is a file; caa extract keeps its unfinished batches there",
         "{tmp}/out.parquet.partial"),
        ("out-in-use", "extract", "extract {pairs} -m {model} -o {tmp}/out.parquet",
         "locked:out.parquet.partial/rank0.lock", "another run is using it", "{tmp}/out.parquet"),
        ("out-in-use-resume", "extract", "extract {pairs} -m {model} -o {tmp}/out.parquet --resume",
         "locked:out.parquet.partial/rank0.lock", "another run is using it", "{tmp}/out.parquet"),
        ("out-is-vectors", "extract", "extract {pairs} -m {model} -o {vectors}", "",
         "is a 'vectors' file from `caa compute-vectors`, not a 'activations' file", "{vectors}"),
        # compute-vectors
        ("out-is-input-dotdot", "compute-vectors", "compute-vectors {acts} -o {tmp}/sub/../acts.parquet",
         "dir:sub", INPUT, "{tmp}/sub/../acts.parquet"),
        ("out-is-second-input", "compute-vectors", "compute-vectors {acts} {tmp}/acts2.parquet -o "
         "{tmp}/acts2.parquet", "copy:acts2.parquet={acts}", INPUT, "{tmp}/acts2.parquet"),
        ("out-is-input-symlink-chain", "compute-vectors", "compute-vectors {acts} -o {tmp}/b.parquet",
         "link:a.parquet={acts} link:b.parquet={tmp}/a.parquet", INPUT, "{tmp}/b.parquet"),
        ("out-below-a-file", "compute-vectors", "compute-vectors {acts} -o {pairs}/x/vectors.parquet", "",
         "is a file, not a directory", "{pairs}"),
        ("out-is-pairs", "compute-vectors", "compute-vectors {acts} -o {pairs}", "",
         "is a 'pairs' file from `caa ingest`, not a 'vectors' file", "{pairs}"),
        # sweep: its table and its plot
        ("out-is-vectors", "sweep", SWEEP_CMD + " -o {vectors}", "", INPUT, "{vectors}"),
        ("out-is-pairs-symlink", "sweep", SWEEP_CMD + " -o {tmp}/s.parquet", "link:s.parquet={pairs}", INPUT,
         "{tmp}/s.parquet"),
        ("out-is-neutral-dotdot", "sweep", SWEEP_CMD + " -o {tmp}/sub/../neutral.jsonl", "dir:sub", INPUT,
         "{tmp}/sub/../neutral.jsonl"),
        ("plot-is-an-input", "sweep", SWEEP_CMD.replace("neutral.jsonl", "n.png") + " -o {tmp}/n.parquet",
         "copy:n.png={neutral}", "is the input {tmp}/n.png", "{tmp}/n.png"),
        ("plot-is-a-directory", "sweep", SWEEP_CMD + " -o {tmp}/s.parquet", "dir:s.png", "is a directory",
         "{tmp}/s.png"),
        ("plot-is-a-foreign-png", "sweep", SWEEP_CMD + " -o {tmp}/s.parquet", "png:s.png",
         "a PNG image not made by caa, not a 'plot' file", "{tmp}/s.png"),
        ("out-is-pairs-kind", "sweep", SWEEP_CMD + " -o {tmp}/p2.parquet", "copy:p2.parquet={pairs}",
         "is a 'pairs' file from `caa ingest`, not a 'sweep' file", "{tmp}/p2.parquet"),
        ("out-has-no-name", "sweep", SWEEP_CMD + " -o ''", "", "give a file name", "--out"),
        # generate
        ("out-is-vectors", "generate", GENERATE_CMD + " -o {vectors}", "", INPUT, "{vectors}"),
        ("out-is-prompts-symlink", "generate", GENERATE_CMD + " --prompts {prompts} -o {tmp}/g.parquet",
         "link:g.parquet={prompts}", "is the input {prompts}", "{tmp}/g.parquet"),
        ("out-is-prompts-hardlink", "generate", GENERATE_CMD + " --prompts {prompts} -o {tmp}/h.txt",
         "hard:h.txt={prompts}", "is the input {prompts}", "{tmp}/h.txt"),
        ("out-is-directory", "generate", GENERATE_CMD + " -o {tmp}", "", "is a directory", "{tmp}"),
        # a file inside a directory input (a model's weights, an SAE's), never replaced, --force or not
        ("out-in-model-dir-force", "extract", "extract {pairs} -m {tmp}/m -o {tmp}/m/model.safetensors "
         "--force", "tree:m={model}", INSIDE, "{tmp}/m/model.safetensors"),
        ("out-in-model-dir", "extract", "extract {pairs} -m {tmp}/m -o {tmp}/m/model.safetensors",
         "tree:m={model}", INSIDE, "{tmp}/m/model.safetensors"),
        ("out-in-model-dir-symlink", "extract", "extract {pairs} -m {tmp}/m -o {tmp}/w.safetensors --force",
         "tree:m={model} link:w.safetensors={tmp}/m/model.safetensors", INSIDE, "{tmp}/w.safetensors"),
        ("out-in-sae-dir-force", "import", "import {tmp}/sae --feature 2 -m {model} -o "
         "{tmp}/sae/sae_weights.safetensors --force", "text:sae/cfg.json text:sae/sae_weights.safetensors",
         INSIDE, "{tmp}/sae/sae_weights.safetensors"),
        ("out-in-model-dir-force", "sweep", SWEEP_CMD.replace("{model}", "{tmp}/m")
         + " -o {tmp}/m/config.json --force", "tree:m={model}", INSIDE, "{tmp}/m/config.json"),
        ("out-in-model-dir-force", "generate", GENERATE_CMD.replace("{model}", "{tmp}/m")
         + " -o {tmp}/m/tokenizer.json --force", "tree:m={model}", INSIDE, "{tmp}/m/tokenizer.json"),
    ]
]  # fmt: skip


@pytest.mark.parametrize("case", OUT_CASES, ids=[f"{c.stage}-{c.id}" for c in OUT_CASES])
def test_bad_output(case: OutCase, valid: Valid, tmp_path: Path) -> None:
    files = copies(valid, tmp_path)
    subs = files.subs(valid)
    setup(case.setup, tmp_path, subs)
    before = snapshot(tmp_path)
    try:
        result = runner.invoke(app, shlex.split(case.args.format(**subs)))
    finally:
        while HELD:
            HELD.pop().close()
    lines = result.output.strip().splitlines()
    wrong = []
    if result.exit_code != 2:
        wrong.append(f"exit code {result.exit_code}, expected 2")
    if len(lines) != 1:
        wrong.append(f"{len(lines)} lines of output, expected 1")
    if case.problem.format(**subs) not in result.output:
        wrong.append(f"the message lacks {case.problem.format(**subs)!r}")
    if case.names.format(**subs) not in result.output:
        wrong.append(f"the message does not name {case.names.format(**subs)!r}")
    if case.problem == INSIDE and "--force" in result.output:
        wrong.append("the message suggests --force, which would destroy the input")
    after = snapshot(tmp_path)
    if after != before:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        wrong.append(f"changed {changed}")
    assert not wrong, "; ".join(wrong) + "\n" + _describe(result)


def test_readme_lists_the_output_cases() -> None:
    readme = (Path(__file__).parents[1] / "bad_inputs" / "README.md").read_text()
    section = readme.split("## Outputs that would destroy data", 1)[1]
    for case in OUT_CASES:
        assert f"| `{case.stage}-{case.id}` |" in section, case.id


# --- replacing a file: a rerun, or --force ----------------------------------------------------------


def test_rerun_replaces_its_own_kind_with_a_notice(valid: Valid, tmp_path: Path) -> None:
    files = copies(valid, tmp_path)
    out = tmp_path / "vectors.parquet"
    result = runner.invoke(app, ["compute-vectors", str(files.tmp / "acts.parquet"), "-o", str(out)])
    assert result.exit_code == 0, _describe(result)
    assert f"warning: {out} exists (a 'vectors' file from `caa compute-vectors`): replacing it" in " ".join(
        result.output.split()
    )
    assert read_meta(out)["kind"] == "vectors"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("existing", ["dataset", "text", "activations"])
def test_other_files_are_replaced_only_with_force(existing: str, valid: Valid, tmp_path: Path) -> None:
    files = copies(valid, tmp_path)
    out = tmp_path / "pairs-out.parquet"
    if existing == "activations":
        shutil.copy(files.tmp / "acts.parquet", out)
    else:
        setup(f"{existing}:{out.name}", tmp_path, {})
    old = out.read_bytes()
    args = ["ingest", str(files.tmp / "mood.jsonl"), "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and FORCE in result.output, _describe(result)
    assert out.read_bytes() == old
    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0, _describe(result)
    assert "replacing it, as --force asks" in " ".join(result.output.split())
    assert read_artifact(out, PAIRS).table.num_rows == len(FREEFORM_ROWS)
    assert not list(tmp_path.glob("*.tmp"))


def test_plots_made_by_caa_are_replaced_and_other_pngs_need_force(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig(tmp_path / "tagged.png", format="png", metadata={"Software": PNG_SOFTWARE})
    fig.savefig(tmp_path / "older.png", format="png")  # before caa tagged its plots
    fig.savefig(tmp_path / "other.png", format="png", metadata={"Software": "GIMP"})
    plt.close(fig)
    for name, what in [("tagged", "a plot from `caa sweep`"), ("older", "a Matplotlib plot")]:
        notices = check_outputs([], [(tmp_path / f"{name}.png", PLOT)])
        assert len(notices) == 1 and what in notices[0] and notices[0].endswith(": replacing it")
    with pytest.raises(CaaError, match="a PNG image not made by caa, not a 'plot' file; add --force"):
        check_outputs([], [(tmp_path / "other.png", PLOT)])
    assert "as --force asks" in check_outputs([], [(tmp_path / "other.png", PLOT)], force=True)[0]


def test_check_outputs_refuses_two_outputs_that_are_one_file(tmp_path: Path) -> None:
    (tmp_path / "a.parquet").write_bytes(b"")
    os.link(tmp_path / "a.parquet", tmp_path / "b.parquet")
    (tmp_path / "c.parquet").symlink_to(tmp_path / "d.parquet")  # dangling: d is not written yet
    for first, second in [("a", "b"), ("c", "d"), ("d", "sub/../d")]:
        outputs = [(tmp_path / f"{first}.parquet", SWEEP), (tmp_path / f"{second}.parquet", PLOT)]
        with pytest.raises(CaaError, match="two outputs of one run are the same file"):
            check_outputs([], outputs)
    assert check_outputs([None, tmp_path / "a.parquet"], [(tmp_path / "new.parquet", SWEEP)]) == []


# --- the sweep's files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "plot"),
    [
        ("sweep.parquet", "sweep.png"),
        ("result.png", "result.plot.png"),
        ("result.PNG", "result.plot.png"),
        ("result", "result.png"),
        ("result.items.parquet", "result.items.png"),
        (".png", ".png.png"),
        ("a.b/c.plot", "a.b/c.png"),
    ],
)
def test_sweep_paths_are_distinct_and_beside_the_table(out: str, plot: str) -> None:
    table, items, plot_path = sweep_paths(Path(out))
    assert table == Path(out) and plot_path == Path(plot)
    assert items == Path(out).with_name(Path(out).stem + ".items.parquet")
    assert len({str(p).lower() for p in (table, items, plot_path)}) == 3  # even on a case-blind disk
    assert table.parent == items.parent == plot_path.parent


def sweep_args(files: Files, valid: Valid, out: Path) -> list[str]:
    line = SWEEP_CMD.format(**files.subs(valid)) + " --max-pairs 2 --neutral-count 1"
    return [*shlex.split(line), "-o", str(out)]


def test_sweep_to_a_png_writes_three_distinct_files_and_reruns(valid: Valid, tmp_path: Path) -> None:
    files = copies(valid, tmp_path)
    out = tmp_path / "result.png"
    result = runner.invoke(app, sweep_args(files, valid, out))
    assert result.exit_code == 0, _describe(result)
    assert read_artifact(out, SWEEP).table.num_rows > 0  # the table keeps the name given
    plot = tmp_path / "result.plot.png"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    items = tmp_path / "result.items.parquet"
    assert sweep_paths(out) == (out, items, plot) and read_meta(items)["kind"] != "sweep"
    result = runner.invoke(app, sweep_args(files, valid, out))
    assert result.exit_code == 0, _describe(result)
    said = " ".join(result.output.split())
    assert f"{out} exists (a 'sweep' file from `caa sweep`): replacing it" in said
    assert f"{plot} exists (a plot from `caa sweep`): replacing it" in said
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("failure", [CaaError("the plot failed"), KeyboardInterrupt()])
def test_a_failed_plot_leaves_the_old_table_and_plot(
    failure: BaseException, valid: Valid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = copies(valid, tmp_path)
    out = tmp_path / "sweep.parquet"
    result = runner.invoke(app, sweep_args(files, valid, out))
    assert result.exit_code == 0, _describe(result)
    before = snapshot(tmp_path)
    plotted: list[Path] = []

    def plot_sweep(table: object, items: object, recommended: object, path: Path, **options: object) -> None:
        path.write_bytes(b"half a plot")
        plotted.append(path)
        raise failure

    monkeypatch.setattr("caa.stages.sweep.plot_sweep", plot_sweep)
    result = runner.invoke(app, [*sweep_args(files, valid, out), "--multipliers", "-2,2"])
    assert result.exit_code != 0
    assert plotted and plotted[0].parent == tmp_path and plotted[0].name.endswith(".tmp")
    assert snapshot(tmp_path) == before  # the old table and plot, and no temporary


# --- atomic_paths ---------------------------------------------------------------------------------------


def generations(text: str, rows: int = 50) -> pa.Table:
    columns = {
        "prompt_index": list(range(rows)),
        "prompt": ["p"] * rows,
        "behavior": ["mood"] * rows,
        "layer": [1] * rows,
        "multiplier": [1.0] * rows,
        "text": [text] * rows,
        "n_tokens": [3] * rows,
        "probe_score": [None] * rows,
        "judge_rating": [None] * rows,
    }
    return columns_table(columns, GENERATIONS.schema())


def test_atomic_paths_commits_all_or_nothing(tmp_path: Path) -> None:
    table, plot = tmp_path / "t.parquet", tmp_path / "t.png"
    table.write_bytes(b"old table")
    plot.write_bytes(b"old plot")
    with pytest.raises(KeyboardInterrupt), atomic_paths([table, plot]) as (t, p):
        assert t.parent == p.parent == tmp_path and t.name.startswith(".t.parquet.") and t.suffix == ".tmp"
        t.write_bytes(b"new table")
        raise KeyboardInterrupt
    with pytest.raises(CaaError, match=r"t\.png: is a directory"), atomic_paths([table, plot]) as (t, p):
        t.write_bytes(b"new table")
        plot.unlink()
        plot.mkdir()  # made while the block ran: found before any rename
    assert table.read_bytes() == b"old table" and plot.is_dir()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.parquet", "t.png"]
    plot.rmdir()
    with atomic_paths([table, plot]) as (t, p):
        t.write_bytes(b"new table")
        p.write_bytes(b"new plot")
    assert table.read_bytes() == b"new table" and plot.read_bytes() == b"new plot"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.parquet", "t.png"]


def test_temporaries_are_unique_and_files_get_the_usual_mode(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.parquet"
    with atomic_path(out) as first, atomic_path(out) as second:
        assert first != second
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert out.read_bytes() == b"1"  # the block that ended last wins, whole
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_concurrent_writers_of_one_output_both_succeed(tmp_path: Path) -> None:
    out = tmp_path / "gen.parquet"
    tables = {name: generations(name) for name in ("first", "second", "third")}
    start = threading.Barrier(len(tables))
    errors: list[BaseException] = []

    def writer(table: pa.Table) -> None:
        try:
            start.wait()
            for _ in range(20):
                write_artifact(table, out, GENERATIONS, make_meta(GENERATIONS, {}))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in tables.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    written = read_artifact(out, GENERATIONS).table
    assert any(written.equals(t) for t in tables.values())
    assert [p.name for p in tmp_path.iterdir()] == ["gen.parquet"]


# --- resumable pieces ------------------------------------------------------------------------------------


def _garbage(path: Path) -> None:
    path.write_bytes(b"not parquet at all" * 10)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _no_rows(path: Path) -> None:
    pq.write_table(pq.read_table(path).slice(0, 0), path)


@pytest.mark.parametrize(
    ("damage", "piece"),
    [(_empty, -1), (_half, -1), (_garbage, 2), (_no_rows, 0)],
    ids=["empty-last", "truncated-last", "garbage-middle", "no-rows-first"],
)
def test_resume_redoes_a_lost_piece(
    damage: Callable[[Path], None], piece: int, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    pairs_path = many_pairs(tmp_path / "pairs.parquet", 30)
    pairs = read_pairs(pairs_path)[0]
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    whole, out = tmp_path / "whole.parquet", tmp_path / "out.parquet"
    run_extract(pairs, pairs_path, whole, loaded, BY4)
    with pytest.raises(KeyboardInterrupt):
        run_extract(
            pairs,
            pairs_path,
            out,
            loaded,
            BY4,
            on_texts=Interrupt(20),
        )
    rank0 = partial_dir(out) / "rank0"
    pieces = sorted(rank0.glob("items-*.parquet"))
    assert len(pieces) == 5
    damage(pieces[piece])
    (rank0 / f".{pieces[0].name}.abc123.tmp").write_bytes(b"a piece being written when killed")
    kept = len(pieces) + piece if piece < 0 else piece  # pieces before the damaged one

    notices: list[str] = []
    counted: list[int] = []
    run_extract(
        pairs, pairs_path, out, loaded, BY4, resume=True, notice=notices.append,
        on_texts=counted.append,
    )  # fmt: skip
    assert notices[0].startswith(f"{pieces[kept].name}: ") and notices[0].endswith("to redo")
    assert sum(counted) == 60 and counted[0] == (4 * kept or 4)  # the kept pieces' 4 texts each, once
    assert table_of(out).equals(table_of(whole))
    assert not partial_dir(out).exists() and not list(tmp_path.glob("*.tmp"))


def test_a_piece_corrupt_past_its_footer_is_deleted_then_redone(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    pairs_path = many_pairs(tmp_path / "pairs.parquet", 12)
    pairs = read_pairs(pairs_path)[0]
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    whole, out = tmp_path / "whole.parquet", tmp_path / "out.parquet"
    run_extract(pairs, pairs_path, whole, loaded, BY4)
    with pytest.raises(KeyboardInterrupt):
        run_extract(
            pairs,
            pairs_path,
            out,
            loaded,
            BY4,
            on_texts=Interrupt(24),
        )
    piece = sorted((partial_dir(out) / "rank0").glob("items-*.parquet"))[1]
    data = bytearray(piece.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4 : len(data) - 8 - footer] = b"\xff" * (len(data) - 12 - footer)  # pages gone, footer intact
    piece.write_bytes(bytes(data))
    with pytest.raises(
        CaaError, match=rf"{piece.name}: unreadable .*deleted: run the same command with --resume"
    ) as error:
        run_extract(pairs, pairs_path, out, loaded, BY4, resume=True)
    assert "\n" not in str(error.value)
    assert not piece.exists() and not out.exists() and not list(tmp_path.glob("*.tmp"))
    run_extract(pairs, pairs_path, out, loaded, BY4, resume=True)
    assert table_of(out).equals(table_of(whole))


def test_pieces_are_written_under_unique_temporaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from caa.store import checkpoint

    names: list[str] = []
    real = pq.write_table

    def spy(table: pa.Table, where: object, *args: object, **kwargs: object) -> None:
        names.append(Path(str(where)).name)
        real(table, where, *args, **kwargs)

    monkeypatch.setattr(checkpoint.pq, "write_table", spy)
    pieces = checkpoint.Checkpoint(tmp_path / "out.parquet", {"a": 1})
    pieces.add(2, pa.table({"x": [1, 2]}))
    assert names[0].startswith(".items-000000000-000000002.parquet.") and names[0].endswith(".tmp")
    assert sorted(p.name for p in pieces.dir.iterdir()) == ["items-000000000-000000002.parquet", "run.json"]
    assert json.loads((pieces.dir / "run.json").read_text()) == {"a": 1}
