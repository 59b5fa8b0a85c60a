from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from caa.cli import app
from caa.core.budget import planner_for
from caa.core.prompts import encode, prompt_format
from caa.models.loading import load_model
from caa.stages.options import SweepOptions
from caa.stages.sweep import run_sweep
from caa.stages.vectors import VectorSet
from caa.store.artifacts import read_artifact
from caa.store.schemas import SWEEP, SWEEP_ITEMS
from tests.helpers import FREEFORM_ROWS, MULTIPLIERS, NEUTRAL, held_out, inject_oom, write_pairs_file

runner = CliRunner()


def steered_logits(loaded, ids: list[int], layer: int, delta: torch.Tensor, start: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """One unbatched forward, adding delta at positions >= start of block ``layer``."""

    def hook(module, args, output):  # type: ignore[no-untyped-def]
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, start:] += delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = loaded.blocks[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            return torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), -1)
    finally:
        handle.remove()


def first_steered(positions: str, prompt_end: int) -> int:
    """The paper's rule, written from its description: the vector is added where
    position > instruction_end (``answer``); ``prompt-end`` also at instruction_end; ``all`` everywhere."""
    return {"answer": prompt_end + 1, "prompt-end": prompt_end, "all": 0}[positions]


def greedy_continuation(loaded, ids: list[int], n: int = 32) -> list[int]:  # type: ignore[no-untyped-def]
    """The unsteered model's greedy continuation of one prompt, up to and with its first EOS."""
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            min_new_tokens=1,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
    eos = loaded.tokenizer.eos_token_id
    return out[: out.index(eos) + 1] if eos in out else out


def fluency_reference(loaded, layer: int, delta: torch.Tensor, positions: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Mean KL(unsteered || steered) per token and perplexity, one unbatched forward per text: over
    neutral text at every position (``all``), else over greedy continuations of neutral prompts."""
    style = prompt_format(loaded.tokenizer)
    kl_sum = nll_sum = count = 0.0
    for text in NEUTRAL:
        if positions == "all":
            ids, first, start = loaded.tokenizer(text)["input_ids"], 0, 0
        else:
            prompt = loaded.tokenizer(style.prefix(loaded.tokenizer, text), add_special_tokens=False)[
                "input_ids"
            ]
            ids = prompt + greedy_continuation(loaded, prompt)
            first, start = len(prompt) - 1, first_steered(positions, len(prompt) - 1)
        base = steered_logits(loaded, ids, layer, 0 * delta, 0)[first:-1]
        steer = steered_logits(loaded, ids, layer, delta, start)[first:-1]
        kl_sum += float((base.exp() * (base - steer)).sum())
        nll_sum -= float(steer.gather(1, torch.tensor(ids[first + 1 :])[:, None]).sum())
        count += len(ids) - 1 - first
    return kl_sum / count, float(np.exp(nll_sum / count))


def naive_table(
    loaded, vectors, pairs: pd.DataFrame, layers: list[int], positions: str = "answer"
) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    """The sweep table, one unbatched forward per text and cell, steering the positions the paper's
    rule names (instruction_end: the prompt's last token)."""
    style = prompt_format(loaded.tokenizer)
    rows = []
    for behavior in ("agree", "mood"):
        part = pairs[pairs.behavior == behavior]
        for layer in layers:
            v = torch.from_numpy(vectors.vector(behavior, layer).copy())
            for m in MULTIPLIERS:
                scores = []
                for r in part.itertuples():
                    if r.format == "ab":
                        pos = encode(loaded.tokenizer, style, r.prompt, r.positive, "ab", "answer")
                        neg = encode(loaded.tokenizer, style, r.prompt, r.negative, "ab", "answer")
                        k = pos.read[0]
                        start = first_steered(positions, pos.completion_start - 1)
                        logp = steered_logits(loaded, pos.input_ids[:k], layer, m * v, start)[-1]
                        p_pos, p_neg = logp[pos.input_ids[k]].exp(), logp[neg.input_ids[neg.read[0]]].exp()
                        scores.append(float(p_pos / (p_pos + p_neg)))
                    else:
                        total = []
                        for text in (r.positive, r.negative):
                            e = encode(loaded.tokenizer, style, r.prompt, text, "freeform", "mean")
                            start = first_steered(positions, e.completion_start - 1)
                            logp = steered_logits(loaded, e.input_ids, layer, m * v, start)
                            s = e.completion_start
                            total.append(
                                float(
                                    logp[s - 1 : -1].gather(1, torch.tensor(e.input_ids[s:])[:, None]).sum()
                                )
                            )
                        scores.append(total[0] - total[1])
                kl, ppl = fluency_reference(loaded, layer, m * v, positions)
                rows.append(
                    {
                        "behavior": behavior,
                        "layer": layer,
                        "multiplier": m,
                        "score_mean": np.mean(scores),
                        "score_sem": np.std(scores, ddof=1) / np.sqrt(len(scores)),
                        "kl_mean": kl,
                        "perplexity": ppl,
                    }
                )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("positions", ["answer", "prompt-end", "all"])
@pytest.mark.parametrize("engine", ["fast", "naive"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
def test_sweep_equals_naive_loop(
    pipelines: Callable[[str], tuple[Path, Path]],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    arch: str,
    engine: str,
    positions: str,
) -> None:
    pairs_path, vectors_path = pipelines(arch)
    loaded = load_model(str(tiny_models[arch]), device="cpu")
    vectors = VectorSet.read(vectors_path)
    test = held_out(pairs_path)
    layers = [1, 3]
    notices: list[str] = []
    result = run_sweep(
        loaded,
        vectors,
        test,
        NEUTRAL,
        SweepOptions(layers=layers, multipliers=MULTIPLIERS, engine=engine, steer_positions=positions),
        behaviors=["agree", "mood"],
        planner=planner_for(loaded, max_rows=10),  # small batches: padded, several per layer
        notice=notices.append,
    )
    # sliding-window models fall back to the reference engine, and say so
    fell_back = arch == "gemma3" and engine == "fast" and positions != "all"
    assert [n.split(" (window")[0] for n in notices] == (
        ["gemma3_text has sliding-window layers narrower than these texts"] if fell_back else []
    )
    naive = naive_table(loaded, vectors, test, layers, positions)
    merged = result.table.merge(naive, on=["behavior", "layer", "multiplier"], suffixes=("", "_naive"))
    assert len(merged) == len(naive) == 2 * len(layers) * len(MULTIPLIERS)
    for col in ("score_mean", "score_sem", "kl_mean", "perplexity"):
        np.testing.assert_allclose(merged[col], merged[f"{col}_naive"], atol=1e-4, rtol=1e-4, err_msg=col)
    zero = result.table[result.table.multiplier == 0]
    assert (zero.delta == 0).all() and (zero.kl_mean.abs() < 1e-6).all()
    assert (result.table[result.table.multiplier != 0].kl_mean > 0).all()


def test_sweep_cli_writes_table_plot_and_recommendation(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = str(tiny_models["llama"])
    pairs, vectors = pipelines("llama")
    neutral = tmp_path / "neutral.jsonl"
    neutral.write_text("".join(json.dumps({"text": t}) + "\n" for t in NEUTRAL))
    out = tmp_path / "sweep.parquet"
    result = runner.invoke(
        app,
        [
            "sweep",
            str(vectors),
            str(pairs),
            "-m",
            model,
            "--layers",
            "1,2",
            "--multipliers",
            "-1,1",
            "--neutral",
            str(neutral),
            "-o",
            str(out),
            "--max-kl",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    art = read_artifact(out, SWEEP)
    table = art.table.to_pandas()
    assert sorted(set(table.multiplier)) == [-1.0, 0.0, 1.0]  # 0 added: the baseline
    assert len(table) == 2 * 2 * 3
    assert set(table.score_kind) == {"p_match", "logp_diff"}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert any(
        words in result.output
        for words in ("recommended for", "no (layer, multiplier) raises", "steers mood reliably")
    )
    assert set(art.meta["recommended"]) == set(art.meta["best_unreliable"]) == {"agree", "mood"}
    assert (
        art.meta["fluency"]["kind"] == "continuation" and art.meta["options"]["steer_positions"] == "answer"
    )
    assert "per-item steerability" in result.output and "95% CI" in result.output
    # the per-item table: its means are the summary's, its slopes each item's least-squares fit
    items = read_artifact(tmp_path / "sweep.items.parquet", SWEEP_ITEMS).table.to_pandas()
    assert len(items) == (len(table[table.behavior == "agree"].n.iloc[:1]) and table.n.iloc[0]) * 2 * 3 + (
        table[table.behavior == "mood"].n.iloc[0] * 2 * 3
    )
    means = items.groupby(["behavior", "layer", "multiplier"]).score.mean()
    merged = table.set_index(["behavior", "layer", "multiplier"]).join(means)
    np.testing.assert_allclose(merged.score, merged.score_mean, rtol=1e-9)
    for (_, _, _), g in items.groupby(["behavior", "layer", "pair_id"]):
        assert g.slope.iloc[0] == pytest.approx(np.polyfit(g.multiplier, g.score, 1)[0], abs=1e-9)
    shown = runner.invoke(app, ["inspect", str(tmp_path / "sweep.items.parquet"), "--no-check-inputs"])
    assert shown.exit_code == 0, shown.output
    assert "sweep_items" in shown.output and "anti" in shown.output
    anti = items.drop_duplicates(["behavior", "layer", "pair_id"]).groupby(["behavior", "layer"]).slope
    np.testing.assert_allclose(
        table.drop_duplicates(["behavior", "layer"]).set_index(["behavior", "layer"]).anti_fraction,
        anti.apply(lambda x: (x < 0).mean()),
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "7"], "--layers '7': layer 7 is out of range; valid layers are 0-3"),
        (["--behavior", "nosuch"], "no behavior 'nosuch'"),
        (["--multipliers", "1,x"], "--multipliers '1,x': 'x' is not a number"),
        (["--model", "OTHER"], "field 'model.weights_hash'"),
        (["--neutral", "missing.jsonl"], "missing.jsonl: file not found"),
        (["--multipliers", "1e308"], "beyond what torch.float32 activations hold"),
        (["--multipliers", "-1e25,1"], "x1e+25 times the layer-"),
        (["--steer-positions", "last"], "--steer-positions 'last': use one of answer, prompt-end, all"),
        (["--max-anti", "2"], "--max-anti 2.0: must be between 0 and 1"),
    ],
)
def test_sweep_bad_input(
    pipelines: Callable[[str], tuple[Path, Path]],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    pairs, vectors = pipelines("llama")
    args = [str(tiny_models["qwen2"]) if a == "OTHER" else a for a in args]
    if "--model" not in args:
        args = [*args, "--model", str(tiny_models["llama"])]
    out = tmp_path / "sweep.parquet"
    result = runner.invoke(app, ["sweep", str(vectors), str(pairs), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_sweep_refuses_a_layer_the_vectors_lack(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    pairs = write_pairs_file(tmp_path / "pairs.parquet", {"mood": FREEFORM_ROWS}, test_fraction=0.5)
    model = str(tiny_models["llama"])
    acts, vectors = tmp_path / "a.parquet", tmp_path / "v.parquet"
    assert (
        runner.invoke(app, ["extract", str(pairs), "-m", model, "-o", str(acts), "--layers", "1,2"]).exit_code
        == 0
    )
    assert runner.invoke(app, ["compute-vectors", str(acts), "-o", str(vectors)]).exit_code == 0
    result = runner.invoke(app, ["sweep", str(vectors), str(pairs), "-m", model, "--layers", "3"])
    assert result.exit_code == 2
    assert "no vector for 'mood' at layer 3; it has layers 1, 2" in result.output
    (tmp_path / "e").mkdir()
    empty = write_pairs_file(tmp_path / "e" / "pairs.parquet", {"mood": FREEFORM_ROWS}, test_fraction=0.0)
    result = runner.invoke(app, ["sweep", str(vectors), str(empty), "-m", model])
    assert result.exit_code == 2
    assert "no pairs in split 'test'" in result.output


def test_one_held_out_pair_gives_null_errors_not_a_crash(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    pairs, vectors = pipelines("llama")
    out = tmp_path / "one.parquet"
    args = ["sweep", str(vectors), str(pairs), "-m", str(tiny_models["llama"]), "--layers", "1"]
    result = runner.invoke(app, [*args, "--max-pairs", "1", "--multipliers", "-1,1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    table = read_artifact(out, SWEEP).table.to_pandas()
    assert (table.n == 1).all()
    assert table.score_sem.isna().all() and table.delta_low.isna().all() and table.delta_high.isna().all()
    assert table.anti_fraction.notna().all()  # one item still has a slope
    assert "no cell steers" in result.output or "no (layer, multiplier) raises" in result.output


@pytest.mark.parametrize("window", [4, 256])
def test_sliding_window_models_use_the_prefix_cache_when_every_batch_fits(
    tiny_models: dict[str, Path], window: int
) -> None:
    """Gemma 3's sliding window: with a window wider than every batch, the fast engine (prefix cache)
    runs and equals the reference engine; with a narrower one, the reference engine runs, and says so."""
    from caa.evaluation.engines import ScoreText, reference_grid, run_grid
    from caa.evaluation.scoring import completion_logprobs

    loaded = load_model(str(tiny_models["gemma3"]), device="cpu")
    loaded.model.config.get_text_config().sliding_window = window
    torch.manual_seed(5)
    texts = [ScoreText(tuple(torch.randint(10, 200, (n,)).tolist()), n - 3, n - 4, 3) for n in (9, 12, 15)]
    vectors = {1: torch.randn(loaded.hidden_size), 2: torch.randn(loaded.hidden_size)}
    notices: list[str] = []
    fast = run_grid("fast", loaded, texts, vectors, [-1.0, 0.0, 2.0], completion_logprobs, "answer",
                    notice=notices.append)  # fmt: skip
    ref = reference_grid(loaded, texts, vectors, [-1.0, 0.0, 2.0], completion_logprobs, "answer")
    for layer in vectors:
        np.testing.assert_allclose(fast[layer], ref[layer], atol=1e-5, rtol=1e-5)
    assert bool(notices) == (window == 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_engine_equals_the_reference_with_a_shared_start_and_edge_layers(
    tiny_models: dict[str, Path], arch: str
) -> None:
    """Texts that all start with the same tokens (as a chat template's system prompt makes them): the
    fast engine runs that start once, replays blocks 0..l, and reduces the fluency cost on raw logits;
    every cell equals the reference engine's, at block 0 and at the last block too."""
    from caa.evaluation.engines import ScoreText, reference_grid, run_grid
    from caa.evaluation.scoring import completion_logprobs, fluency_sums

    loaded = load_model(str(tiny_models[arch]), device="cpu")
    torch.manual_seed(7)
    start = torch.randint(10, 100, (6,)).tolist()
    texts = [
        ScoreText(tuple(start + torch.randint(10, 100, (n,)).tolist()), 6 + n - 4, 6 + n - 5, 4)
        for n in (5, 8, 11, 6)
    ]
    vectors = {0: torch.randn(loaded.hidden_size), loaded.num_layers - 1: torch.randn(loaded.hidden_size)}
    multipliers = [-1.0, 0.0, 2.0]
    planner = planner_for(loaded, max_rows=6)  # two texts a batch
    for reduce in (fluency_sums(1), completion_logprobs):
        fast = run_grid("fast", loaded, texts, vectors, multipliers, reduce, "answer", planner)
        ref = reference_grid(loaded, texts, vectors, multipliers, reduce, "answer", planner)
        for layer in vectors:
            np.testing.assert_allclose(fast[layer], ref[layer], atol=1e-5, rtol=1e-4)


def test_fluency_reduction_on_raw_logits_equals_the_log_probability_one() -> None:
    """The fast engine's way (the unsteered cell apart, raw logits) gives the reference's numbers."""
    from caa.evaluation.engines import ScoreText, SplitReduce
    from caa.evaluation.scoring import fluency_sums

    torch.manual_seed(3)
    texts = [ScoreText(tuple(range(10, 20)), 5, 4, 5), ScoreText(tuple(range(30, 37)), 3, 2, 3)]
    logits = torch.randn(2, 3, 5, 50) * 4  # [texts, multipliers, width, vocab]; multiplier 1 is x0
    valid = torch.arange(5)[None, :] < torch.tensor([5, 3])[:, None]
    reduce = fluency_sums(1)
    assert isinstance(reduce, SplitReduce)
    ref = reduce(texts, torch.log_softmax(logits, -1), valid)
    base, state = reduce.unsteered(texts, logits[:, 1], valid)
    steered = reduce.steered(texts, logits[:, [0, 2]], valid, state)
    got = torch.cat([steered[:, :1], base, steered[:, 1:]], 1)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert (base[..., 0] == 0).all()  # KL of the unsteered cell with itself


def test_steered_passes_write_the_repeated_cache_in_place(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast engine repeats each batch's prefix cache into tensors with room for the tail, which
    every pass writes in place: the same numbers, bit for bit, as concatenating, and used for a plain
    dynamic cache (a spy counts it)."""
    import caa.evaluation.engines as engine
    from caa.evaluation.engines import ScoreText, run_grid
    from caa.evaluation.scoring import completion_logprobs, fluency_sums

    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    torch.manual_seed(11)
    start = torch.randint(10, 100, (5,)).tolist()
    texts = [
        ScoreText(tuple(start + torch.randint(10, 100, (n,)).tolist()), 5 + n - 3, 5 + n - 4, 3)
        for n in (4, 9, 6)
    ]
    vectors = {1: torch.randn(loaded.hidden_size), 2: torch.randn(loaded.hidden_size)}
    used = []
    in_place = engine.repeated_in_place

    def spy(*args: object) -> object:
        rewind = in_place(*args)
        used.append(rewind is not None)
        return rewind

    for reduce in (fluency_sums(1), completion_logprobs):
        monkeypatch.setattr(engine, "repeated_in_place", spy)
        written = run_grid("fast", loaded, texts, vectors, [-1.0, 0.0, 2.0], reduce, "answer")
        monkeypatch.setattr(engine, "repeated_in_place", lambda *args: None)
        concatenated = run_grid("fast", loaded, texts, vectors, [-1.0, 0.0, 2.0], reduce, "answer")
        for layer in vectors:
            np.testing.assert_array_equal(written[layer], concatenated[layer])
    assert used and all(used)


def test_continuations_run_the_shared_start_once_and_equal_greedy_generation(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fluency cost's continuations of prompts that start alike (a chat template's system
    prompt) continue a prefix cache in which that start ran once: each equals the prompt's own
    unbatched greedy continuation, and the shared start is run as one row."""
    import caa.evaluation.kvcache as kvcache
    from caa.evaluation.fluency import _continue

    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    torch.manual_seed(13)
    start = torch.randint(10, 100, (7,)).tolist()
    prompts = [start + torch.randint(10, 100, (n,)).tolist() for n in (3, 6, 1, 4)]
    widths: list[tuple[int, ...]] = []
    prefix_cache = kvcache.prefix_cache

    def spy(loaded_: object, heads: list[list[int]], kwarg: str) -> object:
        widths.append((len(heads), kvcache.shared_length(heads)))
        return prefix_cache(loaded_, heads, kwarg)  # type: ignore[arg-type]

    monkeypatch.setattr("caa.evaluation.fluency.prefix_cache", spy)
    texts = _continue(loaded, prompts, 6, batch_size=4)
    assert widths == [(4, 7)]
    for prompt, text in zip(prompts, texts, strict=True):
        assert list(text.input_ids) == prompt + greedy_continuation(loaded, prompt, 6)
        assert (text.prompt_length, text.read_from) == (len(prompt), len(prompt) - 1)


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_a_batch_out_of_cuda_memory_is_retried_in_halves(
    pipelines: Callable[[str], tuple[Path, Path]],
    tiny_models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    engine: str,
) -> None:
    """A sweep whose batches run out of CUDA memory (injected on the CPU) retries them in halves,
    says so, and gives the table of the run without errors; at one text a batch it is an error."""
    from caa.errors import CaaError

    pairs_path, vectors_path = pipelines("llama")
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    vectors, test = VectorSet.read(vectors_path), held_out(pairs_path)

    def run(notice: Callable[[str], None] | None = None) -> pd.DataFrame:
        return run_sweep(
            loaded, vectors, test, NEUTRAL,
            SweepOptions(layers=(1, 3), multipliers=(-1.0, 0.0, 2.0), engine=engine),
            behaviors=["agree", "mood"], planner=planner_for(loaded, max_rows=24), notice=notice,
        ).table  # fmt: skip

    clean = run()
    sizes = inject_oom(monkeypatch, loaded, max_rows=6)  # two texts x three multipliers
    notices: list[str] = []
    halved = run(notices.append)
    assert any(s > 6 for s in sizes) and any(n.startswith("CUDA out of memory at ") for n in notices)
    assert all("retrying at" in n for n in notices if n.startswith("CUDA")), notices
    columns = ["score_mean", "kl_mean", "perplexity"]
    np.testing.assert_allclose(halved[columns], clean[columns], rtol=1e-4, atol=1e-6)
    inject_oom(monkeypatch, loaded, max_rows=0)
    with pytest.raises(CaaError, match="out of GPU memory with a batch of one of the"):
        run()
