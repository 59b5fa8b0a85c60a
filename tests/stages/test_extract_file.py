"""caa.stages.extract_file, the run that streams to a file: interrupted extraction leaves nothing that looks
complete, --resume finishes the same file, and processes share whole batches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from caa.cli import app
from caa.core.distributed import Shard
from caa.errors import CaaError, MismatchError
from caa.models.loading import load_model
from caa.stages.extract_file import run_extract
from caa.stages.ingest import read_pairs
from caa.stages.options import ExtractOptions
from caa.store.artifacts import read_artifact
from caa.store.checkpoint import RunLock, partial_dir
from caa.store.schemas import ACTIVATIONS
from tests.helpers import REPO, write_pairs_file

BY4 = ExtractOptions(layers=(0, 1, 2, 3), batch_size=4)  # every block of the tiny models
BY2 = ExtractOptions(layers=(1, 2), batch_size=2)

runner = CliRunner()


def many_pairs(path: Path, n: int) -> Path:
    rows = [
        {
            "prompt": f"Tell me about item {i}.",
            "positive": f"Item {i} is lovely" + " indeed" * (i % 7),
            "negative": f"Item {i} is awful" + " really" * (i % 5),
        }
        for i in range(n)
    ]
    return write_pairs_file(path, {"mood": rows})


def table_of(path: Path) -> pa.Table:
    art = read_artifact(path, ACTIVATIONS)
    assert art.meta["kind"] == "activations"
    return art.table


class Interrupt:
    """An on_texts callback that presses Ctrl-C after ``after`` texts."""

    def __init__(self, after: int) -> None:
        self.after, self.seen = after, 0

    def __call__(self, texts: int) -> None:
        self.seen += texts
        if self.seen >= self.after:
            raise KeyboardInterrupt


def test_resume_gives_the_uninterrupted_file_and_skips_finished_work(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    pairs_path = many_pairs(tmp_path / "pairs.parquet", 30)
    pairs = read_pairs(pairs_path)[0]
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    whole, out = tmp_path / "whole.parquet", tmp_path / "out.parquet"
    run_extract(pairs, pairs_path, whole, loaded, BY4)
    assert not partial_dir(whole).exists()

    with pytest.raises(KeyboardInterrupt):
        run_extract(
            pairs,
            pairs_path,
            out,
            loaded,
            BY4,
            on_texts=Interrupt(20),
        )
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    pieces = sorted(p.name for p in (partial_dir(out) / "rank0").iterdir())
    assert pieces[0] == "items-000000000-000000004.parquet" and len(pieces) == 6  # 5 batches + run.json

    with pytest.raises(CaaError, match=r"out.parquet.partial holds an interrupted run: add --resume"):
        run_extract(pairs, pairs_path, out, loaded, BY4)
    with pytest.raises(MismatchError, match=r"field 'layers' was \[0, 1, 2, 3\] in the interrupted run"):
        run_extract(
            pairs, pairs_path, out, loaded, ExtractOptions(layers=(0, 1, 2), batch_size=4), resume=True
        )
    with pytest.raises(MismatchError, match="field 'batch_size'"):
        run_extract(
            pairs, pairs_path, out, loaded, ExtractOptions(layers=(0, 1, 2, 3), batch_size=8), resume=True
        )
    other = load_model(str(tiny_models["qwen2"]), device="cpu")
    with pytest.raises(MismatchError, match="field 'model'"):
        run_extract(pairs, pairs_path, out, other, BY4, resume=True)

    notices: list[str] = []
    counted: list[int] = []
    run_extract(
        pairs, pairs_path, out, loaded, BY4, resume=True, notice=notices.append,
        on_texts=counted.append,
    )  # fmt: skip
    assert notices == ["resuming: 20 of 60 texts were done before the interruption"]
    assert counted[0] == 20 and sum(counted) == 60  # progress starts at the finished work...
    assert len(counted) == 1 + 10  # ...and only the 40 remaining texts ran, in batches of 4
    assert table_of(out).equals(table_of(whole))
    assert not partial_dir(out).exists()


def test_killed_extract_leaves_no_output_and_resumes(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A real `caa extract` process, killed with SIGKILL mid-run, then resumed from the command line."""
    pairs_path = many_pairs(tmp_path / "pairs.parquet", 200)
    model = str(tiny_models["llama"])
    out, whole = tmp_path / "out.parquet", tmp_path / "whole.parquet"
    args = ["extract", str(pairs_path), "-m", model, "--batch-size", "1", "--layers", "all"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "caa", *args, "-o", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    pieces = partial_dir(out) / "rank0"
    deadline = time.monotonic() + 300
    try:
        while len(list(pieces.glob("items-*.parquet"))) < 10:
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()!r}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing that looks complete
    done = len(list(pieces.glob("items-*.parquet")))
    assert 10 <= done < 400

    result = runner.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 2 and "--resume" in result.output
    result = runner.invoke(app, [*args, "-o", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    resumed_from = int(result.output.split("resuming: ")[1].split(" of 400")[0])
    assert resumed_from >= done  # every finished piece was kept (the last one may have landed late)
    assert runner.invoke(app, [*args, "-o", str(whole)]).exit_code == 0
    assert table_of(out).equals(table_of(whole))
    assert not partial_dir(out).exists()


# The child pauses (in Python, where a signal is handled at once) after its fifth finished piece, so
# that Ctrl-C lands mid-run whatever the machine's load: with a free-running child the signal raced the
# run's end (a busy CI machine let 200 pairs finish first) or landed in a library call that lost it.
# SIGINT gets Python's own handler, as under a terminal: a test run started in the background of a
# non-interactive shell inherits SIGINT ignored, and a process that ignores it rightly keeps running.
CTRL_C_CHILD = """
import signal, sys, time
from pathlib import Path
import caa.store.checkpoint as checkpoint

signal.signal(signal.SIGINT, signal.default_int_handler)

ready = Path(sys.argv[1])
add = checkpoint.Checkpoint.add
def paused_add(self, items, table):
    add(self, items, table)
    if self.cursor >= 5 and not ready.exists():
        ready.write_text("paused")
        time.sleep(300)
checkpoint.Checkpoint.add = paused_add
sys.argv = ["caa", *sys.argv[2:]]
from caa.cli import main
main()
"""


def test_ctrl_c_says_how_to_resume(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    pairs_path = many_pairs(tmp_path / "pairs.parquet", 200)
    out = tmp_path / "out.parquet"
    ready = tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["extract", str(pairs_path), "-m", str(tiny_models["llama"]), "--batch-size", "1", "-o", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_CHILD, str(ready), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    try:
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        assert len(list((partial_dir(out) / "rank0").glob("items-*.parquet"))) == 5
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    message = " ".join(stderr.decode().split())
    assert f"the finished batches are kept in {partial_dir(out)}" in message
    assert "run the same command with --resume to continue" in message
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def one_after_the_other(rank: int, world: int) -> Shard:
    """Rank ``rank`` of ``world`` processes run here one after the other: a gather returns this
    rank's items for every rank (each rank agrees with itself)."""
    return Shard(rank, world, lambda items: items * world)


def test_each_process_resumes_its_own_batches(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """One rank killed mid-run: it resumes its own batches, and the merge is the one-process file."""
    pairs_path = many_pairs(tmp_path / "pairs.parquet", 20)
    pairs = read_pairs(pairs_path)[0]
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    one, out = tmp_path / "one.parquet", tmp_path / "out.parquet"
    run_extract(pairs, pairs_path, one, loaded, BY2)

    def rank(r: int, **kw: object) -> None:
        run_extract(pairs, pairs_path, out, loaded, BY2, shard=one_after_the_other(r, 2), **kw)  # type: ignore[arg-type]

    rank(1)  # finishes its batches; only rank 0 merges
    assert not out.exists() and len(list((partial_dir(out) / "rank1").glob("items-*"))) == 10
    with pytest.raises(KeyboardInterrupt):  # (in a real run rank 0 looked before rank 1 started)
        rank(0, resume=True, on_texts=Interrupt(8))
    with pytest.raises(MismatchError, match="field 'processes' was 2 in the interrupted run and is 1 now"):
        run_extract(pairs, pairs_path, out, loaded, BY2, resume=True)
    counted: list[int] = []
    rank(0, resume=True, on_texts=counted.append)
    assert counted[0] == 8 and sum(counted) == 20
    assert table_of(out).equals(table_of(one))  # the same batches: the same rows, bit for bit
    assert not partial_dir(out).exists()


def test_a_run_on_an_output_another_run_is_using_is_refused(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    pairs_path = many_pairs(tmp_path / "pairs.parquet", 6)
    pairs = read_pairs(pairs_path)[0]
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    out = tmp_path / "out.parquet"
    with pytest.raises(KeyboardInterrupt):
        run_extract(pairs, pairs_path, out, loaded, BY2, on_texts=Interrupt(4))
    before = sorted(p.name for p in (partial_dir(out) / "rank0").iterdir())
    other = RunLock(out, 0)  # a run still going (here: an open lock of this process)
    for resume in (False, True):
        with pytest.raises(CaaError, match=rf"{out}: another run is using it"):
            run_extract(pairs, pairs_path, out, loaded, BY2, resume=resume)
    assert sorted(p.name for p in (partial_dir(out) / "rank0").iterdir()) == before  # untouched
    other.release()
    run_extract(pairs, pairs_path, out, loaded, BY2, resume=True)
    assert table_of(out).num_rows == 2 * 6 * 2


def test_a_resume_deletes_pieces_its_run_did_not_record(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A rank's run.json gone (two runs at once left that): its pieces are not this run's to merge."""
    pairs_path = many_pairs(tmp_path / "pairs.parquet", 10)
    pairs = read_pairs(pairs_path)[0]
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    whole, out = tmp_path / "whole.parquet", tmp_path / "out.parquet"
    run_extract(pairs, pairs_path, whole, loaded, BY2)
    with pytest.raises(KeyboardInterrupt):
        run_extract(pairs, pairs_path, out, loaded, BY2, on_texts=Interrupt(8))
    (partial_dir(out) / "rank0" / "run.json").unlink()
    notices: list[str] = []
    run_extract(pairs, pairs_path, out, loaded, BY2, resume=True, notice=notices.append)
    assert notices == [
        f"{partial_dir(out) / 'rank0'}: 4 finished pieces without the run's record (run.json), "
        "written by another run; deleted, to redo"
    ]
    assert table_of(out).equals(table_of(whole))  # 40 rows for 10 pairs, not 56


def test_a_failed_first_batch_does_not_block_a_plain_rerun(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from caa.store import checkpoint

    pairs_path = many_pairs(tmp_path / "pairs.parquet", 4)
    pairs = read_pairs(pairs_path)[0]
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    out = tmp_path / "out.parquet"

    def disk_full(self: object, items: int, table: pa.Table) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.Checkpoint, "add", disk_full)
        with pytest.raises(OSError, match="No space left"):
            run_extract(pairs, pairs_path, out, loaded, BY2)
    assert not partial_dir(out).exists()  # nothing finished, nothing kept
    # what a killed first batch leaves (no cleanup ran): a run.json and no piece, of other options
    checkpoint.Checkpoint(out, {"batch_size": 99})
    run_extract(pairs, pairs_path, out, loaded, BY2)
    assert table_of(out).num_rows == 2 * 4 * 2 and not partial_dir(out).exists()
