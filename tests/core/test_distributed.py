"""Sharing the sweep and generation out over processes (caa.distributed): every process's share,
merged, equals what one process computes; and under torchrun with 2 real CPU processes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from caa.core.budget import planner_for
from caa.core.distributed import Shard
from caa.models.loading import load_model
from caa.stages.generate import Generations
from caa.stages.options import GenerateOptions, SweepOptions
from caa.stages.sweep import SweepResult, run_sweep
from caa.stages.vectors import VectorSet
from tests.helpers import NEUTRAL, held_out, launch, ranks_reported


def test_take_partitions_the_plan_and_balances_it() -> None:
    plan = [[0, 1, 2, 3], [4, 5], [6], [7, 8, 9], [10]]
    cost = len
    shares = [Shard(rank, 3).take(plan, cost) for rank in range(3)]
    assert sorted(b for share in shares for b in share) == sorted(plan)  # each batch once, unchanged
    assert [sum(map(len, share)) for share in shares] == [4, 4, 3]  # largest first to the least loaded
    for share in shares:  # in plan order
        assert share == [b for b in plan if b in share]
    assert Shard().take(plan, cost) == plan


def test_take_splits_a_short_plan_unless_told_not_to() -> None:
    plan = [[0, 1, 2, 3, 4]]
    shares = [Shard(rank, 2).take(plan, len) for rank in range(2)]
    assert shares == [[[0, 1]], [[2, 3, 4]]] or shares == [[[2, 3, 4]], [[0, 1]]]
    kept = [Shard(rank, 2).take(plan, len, split=False) for rank in range(2)]
    assert kept == [plan, []]
    assert [Shard(rank, 4).take([[7]], len) for rank in range(4)] == [[[7]], [], [], []]


class Processes:
    """``world`` processes played by threads: ``run(job)`` calls ``job(shard)`` for every rank at once,
    each shard's gather returning every rank's items in rank order, as accelerate's gather_object."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=300)
        self.slots: list[list[Any]] = [[] for _ in range(world)]

    def shard(self, rank: int) -> Shard:
        def gather(items: list[Any]) -> list[Any]:
            self.slots[rank] = items
            self.barrier.wait()
            everything = [x for slot in self.slots for x in slot]
            self.barrier.wait()  # nobody overwrites a slot before all have read them
            return everything

        return Shard(rank, self.world, gather)

    def run(self, job: Callable[[Shard, int], Any]) -> list[Any]:
        with ThreadPoolExecutor(self.world) as pool:
            futures = [pool.submit(job, self.shard(rank), rank) for rank in range(self.world)]
            return [f.result() for f in futures]


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_two_shards_of_a_sweep_merge_into_the_one_process_result(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], engine: str
) -> None:
    pairs_path, vectors_path = pipelines("llama")
    models = [load_model(str(tiny_models["llama"]), device="cpu") for _ in range(2)]  # one per process
    vectors = VectorSet.read(vectors_path)
    test = held_out(pairs_path)

    def run(shard: Shard, rank: int = 0) -> SweepResult:
        ticks: list[int] = []
        loaded = models[rank]
        result = run_sweep(
            loaded,
            vectors,
            test,
            NEUTRAL,
            SweepOptions(layers=(1, 3), multipliers=(-1.0, 0.0, 2.0), engine=engine),
            behaviors=["agree", "mood"],
            planner=planner_for(loaded, max_rows=6),  # several batches per text set
            tick=ticks.append,
            shard=shard,
        )
        result.meta["ticks"] = sum(ticks)
        return result

    one = run(Shard())
    for merged in Processes(2).run(run):  # every process gets the whole result
        pd.testing.assert_frame_equal(merged.table, one.table, check_exact=True)
        pd.testing.assert_frame_equal(merged.items, one.items, check_exact=True)
        assert merged.recommended == one.recommended and merged.best == one.best
        assert merged.meta["ticks"] == one.meta["ticks"]  # a progress bar ends full


def test_two_shards_of_generation_merge_into_the_one_process_rows(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path]
) -> None:
    from caa.stages.generate import generate_steered

    models = [load_model(str(tiny_models["llama"]), device="cpu") for _ in range(2)]
    vectors = VectorSet.read(pipelines("llama")[1])
    vector = vectors.tensor("mood", 2)
    prompts = ["Hello there.", "Tell me about trains, please.", "Why?", "A long prompt " * 5, "Ok."]

    def run(shard: Shard, rank: int = 0) -> Generations:
        return generate_steered(
            models[rank],
            prompts,
            vector,
            GenerateOptions(layer=2, multipliers=(-2.0, 0.0, 2.0), max_new_tokens=6, batch_size=2),
            shard=shard,
        )

    one = run(Shard())
    for merged in Processes(2).run(run):
        pd.testing.assert_frame_equal(merged.frame, one.frame, check_exact=True)
    assert list(one.frame.prompt_index) == [i for i in range(5) for _ in range(3)]


def _sweep_inputs(pipelines: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> tuple[Path, Path, Path]:
    """The tiny llama's pairs and vectors, and a neutral prompts file."""
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("\n".join(NEUTRAL) + "\n")
    return (*pipelines("llama"), neutral)


def test_two_real_processes_sweep_and_generate_as_one(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    pairs_path, vectors_path, neutral = _sweep_inputs(pipelines, tmp_path)
    model = str(tiny_models["llama"])
    sweep = ["sweep", str(vectors_path), str(pairs_path), "-m", model, "--layers", "1,3"]
    sweep += ["--multipliers", "-1,1", "--neutral", str(neutral), "--batch-size", "6"]
    generate = ["generate", "-v", str(vectors_path), "--behavior", "mood", "--layer", "2", "-m", model]
    generate += ["-p", "Hello there.", "-p", "Why?", "-p", "Tell me about trains.", "--batch-size", "1"]
    generate += ["--max-new-tokens", "6", "--multipliers", "-2,0,2"]
    for n in (1, 2):
        for args, name in ((sweep, "sweep"), (generate, "generations")):
            proc = launch([*args, "-o", str(tmp_path / f"{name}{n}.parquet")], n)
            assert proc.returncode == 0, proc.stderr[-3000:]
            if n == 2:  # two ranks ran, and the main process alone prints
                ranks_reported(proc, 2)
                assert proc.stdout.count("wrote ") == 1, proc.stdout
    one, two = SweepResult.read(tmp_path / "sweep1.parquet"), SweepResult.read(tmp_path / "sweep2.parquet")
    pd.testing.assert_frame_equal(two.table, one.table, check_exact=True)
    pd.testing.assert_frame_equal(two.items, one.items, check_exact=True)
    assert two.meta["recommended"] == one.meta["recommended"]
    assert (tmp_path / "sweep2.png").exists()
    g1, g2 = (
        Generations.read(tmp_path / "generations1.parquet"),
        Generations.read(tmp_path / "generations2.parquet"),
    )
    pd.testing.assert_frame_equal(g2.frame, g1.frame, check_exact=True)
    assert len(g1.frame) == 9 and np.all(g1.frame.n_tokens >= 0)


def test_device_map_auto_sweeps_and_generates_as_one_device(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from caa.cli import app

    pairs_path, vectors_path, neutral = _sweep_inputs(pipelines, tmp_path)
    model = str(tiny_models["llama"])
    runner = CliRunner()
    for placed, extra in (("plain", []), ("auto", ["--device-map", "auto"])):
        sweep = ["sweep", str(vectors_path), str(pairs_path), "-m", model, "--layers", "1,3", *extra]
        sweep += [
            "--multipliers",
            "-1,1",
            "--neutral",
            str(neutral),
            "-o",
            str(tmp_path / f"{placed}.parquet"),
        ]
        result = runner.invoke(app, sweep)
        assert result.exit_code == 0, result.output
        generate = ["generate", "-v", str(vectors_path), "--behavior", "mood", "--layer", "2", "-m", model]
        generate += [
            "-p",
            "Hello there.",
            "--max-new-tokens",
            "5",
            "-o",
            str(tmp_path / f"{placed}.g.parquet"),
        ]
        result = runner.invoke(app, [*generate, *extra])
        assert result.exit_code == 0, result.output
    plain, auto = (SweepResult.read(tmp_path / f"{p}.parquet") for p in ("plain", "auto"))
    pd.testing.assert_frame_equal(auto.table, plain.table, rtol=1e-6)
    assert auto.meta["options"]["device_map"] == "auto"
    g = [Generations.read(tmp_path / f"{p}.g.parquet").frame for p in ("plain", "auto")]
    pd.testing.assert_frame_equal(g[1], g[0])


# --- Shard, unit by unit ------------------------------------------------------------------------


def test_shard_of_one_process_is_the_whole() -> None:
    from types import SimpleNamespace

    from caa.core.distributed import ONE

    assert Shard.of(None) == ONE == Shard(0, 1, None)
    assert Shard.of(SimpleNamespace(num_processes=1, process_index=0)) == ONE
    assert ONE.main and not Shard(1, 2).main and Shard(0, 2).main


def test_shard_of_an_accelerator_takes_its_rank_world_and_gather() -> None:
    from types import SimpleNamespace

    from accelerate.utils import gather_object

    shard = Shard.of(SimpleNamespace(num_processes=3, process_index=2))
    assert (shard.rank, shard.world, shard.gather) == (2, 3, gather_object)
    assert not shard.main


def test_take_splits_the_largest_batch_in_halves_first_and_gives_the_costliest_to_rank_0() -> None:
    plan = [[0, 1, 2, 3, 4, 5]]  # -> [0, 1, 2], [3, 4, 5] -> [0], [1, 2], [3, 4, 5]
    assert [Shard(rank, 3).take(plan, len) for rank in range(3)] == [[[3, 4, 5]], [[1, 2]], [[0]]]
    assert [Shard(rank, 2).take([[0, 1, 2, 3, 4]], len) for rank in range(2)] == [[[2, 3, 4]], [[0, 1]]]
    assert plan == [[0, 1, 2, 3, 4, 5]]  # the caller's plan is not changed


def test_take_balances_by_the_given_cost_not_by_rows() -> None:
    plan = [[0], [1], [2], [3]]
    cost = {0: 10.0, 1: 1.0, 2: 1.0, 3: 1.0}
    shares = [Shard(rank, 2).take(plan, lambda b: cost[b[0]]) for rank in range(2)]
    assert shares == [[[0]], [[1], [2], [3]]]  # 10 against 3: the costly batch alone
    ties = [Shard(rank, 2).take(plan, lambda b: 1.0) for rank in range(2)]
    assert ties == [[[0], [2]], [[1], [3]]]  # equal costs: plan order, round robin


def test_merge_is_the_identity_for_one_process_and_gathers_otherwise() -> None:
    items = [1, 2]
    assert Shard().merge(items) is items
    assert Shard(1, 2, None).merge(items) is items  # no gather: its own items
    gathered = Shard(0, 2, lambda mine: [*mine, 3, 4]).merge(items)
    assert gathered == [1, 2, 3, 4]
