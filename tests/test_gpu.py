"""The accelerator's own checks (``pytest -m gpu``, ``make test-gpu``): bf16 against float32, the fast
sweep engine against the reference engine, steering under the KV cache against a no-cache recomputation,
and extract's out-of-memory halving.

They run on CUDA and are skipped without it. ``CAA_GPU_TESTS_ON=cpu`` runs the same tests on the CPU
(to check their logic where no GPU is), ``CAA_GPU_TESTS_ON=cuda`` makes a missing GPU a failure instead
of a skip (for a GPU CI job). The models are random Llamas built from configs: the session's tiny one
(hidden 32) and a wider one (hidden 256, 6 blocks). The out-of-memory halving also runs on the CPU in
the normal suite: the retry path of extract is device-agnostic, so an injected error exercises it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import caa
from caa.core.prompts import Encoded, collate, prompt_format
from caa.stages.extract import extract_in_memory
from tests.helpers import AB_ROWS, FREEFORM_ROWS, MULTIPLIERS, NEUTRAL, inject_oom, write_pairs_file
from tests.tiny_models import make_tokenizer

gpu = pytest.mark.gpu
MODELS = ("llama", "llama-wide")

# bf16 keeps 8 significant bits: each rounding errs by up to u = 2**-8 (0.39%). A block output goes
# through a few dozen roundings (norms, projections, attention, the residual sum) and the errors of
# the blocks below add up, so single activations differ from float32 by about 1-4% on these models
# (measured on the CPU: median 1.1-1.8%, max 3.7%), and the mean-difference vectors by at most 3.4%
# (cosine >= 0.9994). We allow 10% (about 25 u), and the cosine that a 10% error orthogonal to the
# vector leaves, 1 - 0.1**2 / 2 = 0.995: about three times the measured error, while a wrong vector
# (a layer off by one, a sign, a missed read position) is off by far more than 10%.
BF16_VECTOR_REL_ERROR = 0.10
BF16_VECTOR_COSINE = 0.995
BF16_ACTIVATION_REL_ERROR = 0.15  # per text and layer: fewer terms averaged than in a vector


@pytest.fixture(scope="session")
def gpu_device() -> Iterator[torch.device]:
    """CUDA when there is one (float32 matmuls at full precision, not TF32); otherwise the tests
    are skipped, unless ``CAA_GPU_TESTS_ON`` says ``cpu`` (run here) or ``cuda`` (fail)."""
    where = os.environ.get("CAA_GPU_TESTS_ON", "").strip().lower()
    if where not in ("", "cpu", "cuda"):
        raise pytest.UsageError(f"CAA_GPU_TESTS_ON={where!r}: use cpu or cuda")
    if where == "cpu":
        # one intra-op thread: these models are too small to gain from more, and on a shared machine
        # torch's spinning threads make them several times slower
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield torch.device("cpu")
        finally:
            torch.set_num_threads(threads)
        return
    if not torch.cuda.is_available():
        if where == "cuda":
            pytest.fail("CAA_GPU_TESTS_ON=cuda but torch sees no CUDA device")
        pytest.skip("no CUDA device (CAA_GPU_TESTS_ON=cpu runs these tests on the CPU)")
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield torch.device("cuda")
    finally:
        torch.set_float32_matmul_precision(precision)


def save_wide_llama(directory: Path, hidden: int = 256, layers: int = 6, seed: int = 0) -> Path:
    """A random Llama wider and deeper than the tiny ones, with their tokenizer; weights at the same
    per-block gain as theirs (std 0.2 at hidden 32, scaled by 1 / sqrt(width))."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2 * (32 / hidden) ** 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def gpu_models(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"llama": tiny_models["llama"], "llama-wide": save_wide_llama(tmp_path_factory.mktemp("wide"))}


@pytest.fixture(scope="session")
def gpu_pairs(tmp_path_factory: pytest.TempPathFactory) -> caa.PairSet:
    """agree (A/B) and mood (free-form), half of each held out."""
    path = tmp_path_factory.mktemp("gpu-pairs") / "pairs.parquet"
    rows = {"agree": AB_ROWS, "mood": FREEFORM_ROWS}
    return caa.PairSet.read(write_pairs_file(path, rows, test_fraction=0.5))


def load(directory: Path, device: torch.device, dtype: str = "float32") -> caa.LoadedModel:
    return caa.load_model(str(directory), dtype=dtype, device=device)


def relative_error(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """||x - y|| / ||y|| along the last axis, in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    return np.linalg.norm(x - y, axis=-1) / np.linalg.norm(y, axis=-1)


# --- 1. bf16 activations against float32 ------------------------------------------------------------


@gpu
@pytest.mark.parametrize("name", MODELS)
def test_bf16_vectors_match_float32(
    gpu_device: torch.device, gpu_models: dict[str, Path], gpu_pairs: caa.PairSet, name: str
) -> None:
    """The same pairs extracted in bf16 and in float32 give the same mean-difference vectors at every
    layer, within bf16's rounding (see BF16_VECTOR_REL_ERROR)."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        loaded = load(gpu_models[name], gpu_device, dtype)
        assert loaded.model.dtype == getattr(torch, dtype)
        acts = caa.extract(loaded, gpu_pairs, caa.ExtractOptions(batch_size=8))
        assert acts.values.dtype == np.float32  # recorded in float32 whatever the model's dtype
        runs[dtype] = (acts, caa.compute_vectors(acts))
    (a32, v32), (a16, v16) = runs["float32"], runs["bfloat16"]
    assert a16.keys.equals(a32.keys)
    act_error = relative_error(a16.values, a32.values)  # [rows]
    assert act_error.max() < BF16_ACTIVATION_REL_ERROR, (
        f"activations: max relative error {act_error.max():.4f}"
    )
    assert v16.frame[["behavior", "layer"]].equals(v32.frame[["behavior", "layer"]])
    for behavior in v32.behaviors():
        for layer in v32.layers(behavior):
            x = v16.vector(behavior, layer).astype(np.float64)  # bf16 run
            y = v32.vector(behavior, layer).astype(np.float64)  # float32 run
            cosine = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
            error = float(relative_error(x, y))
            where = f"{name} {behavior} layer {layer}: cosine {cosine:.6f}, relative error {error:.4f}"
            assert error < BF16_VECTOR_REL_ERROR, where
            assert cosine > BF16_VECTOR_COSINE, where


# --- 2. the fast sweep engine against the reference engine --------------------------------------------


SWEEP_COLUMNS = [
    "score_mean",
    "score_sem",
    "delta",
    "delta_low",
    "delta_high",
    "kl_mean",
    "perplexity",
    "perplexity_delta",
    "slope_mean",
    "slope_median",
]


@gpu
@pytest.mark.parametrize("positions", ["answer", "all"])
@pytest.mark.parametrize("name", MODELS)
def test_fast_sweep_equals_reference_engine(
    gpu_device: torch.device, gpu_models: dict[str, Path], gpu_pairs: caa.PairSet, name: str, positions: str
) -> None:
    """``caa.sweep`` with the prefix-cache engine gives the reference engine's table to 1e-4 in
    float32, in several padded batches per layer."""
    loaded = load(gpu_models[name], gpu_device)
    vectors = caa.compute_vectors(caa.extract(loaded, gpu_pairs, caa.ExtractOptions(split="train")))
    layers = [1, loaded.num_layers - 1]
    results = {
        engine: caa.sweep(
            loaded,
            vectors,
            gpu_pairs,
            caa.SweepOptions(
                layers=tuple(layers),
                multipliers=tuple(MULTIPLIERS),
                steer_positions=positions,
                engine=engine,
                max_pairs=4,
                batch_size=6,  # rows (texts x multipliers): several batches, left-padded
            ),
            neutral=NEUTRAL,
        )
        for engine in ("fast", "naive")
    }
    key = ["behavior", "layer", "multiplier"]
    fast, naive = (results[e].table.sort_values(key).reset_index(drop=True) for e in ("fast", "naive"))
    assert len(fast) == 2 * len(layers) * len(MULTIPLIERS) and (fast.n == 4).all()
    assert fast[key].equals(naive[key])
    for col in SWEEP_COLUMNS:
        np.testing.assert_allclose(fast[col], naive[col], rtol=1e-4, atol=1e-4, err_msg=col)
    items_key = [*key, "pair_id"]
    fast_items, naive_items = (
        results[e].items.sort_values(items_key).reset_index(drop=True) for e in ("fast", "naive")
    )
    assert fast_items[items_key].equals(naive_items[items_key])
    np.testing.assert_allclose(fast_items.score, naive_items.score, rtol=1e-4, atol=1e-4)
    steered = fast[fast.multiplier != 0]
    assert (steered.kl_mean > 0).all()  # the comparison is not between two unsteered runs


# --- 3. steering under the KV cache --------------------------------------------------------------------


PROMPTS = ["Tell me about the weather.", "hi", "Do you think the city is nice?"]  # unequal: left padding
NEW_TOKENS = 12
GEN_MULTIPLIERS = [-4.0, 0.0, 4.0]


def prompt_ids(loaded: caa.LoadedModel, prompt: str) -> list[int]:
    """The prompt's ids as ``caa generate`` makes them."""
    tok, style = loaded.tokenizer, prompt_format(loaded.tokenizer)
    return list(tok(style.prefix(tok, prompt), add_special_tokens=not style.chat)["input_ids"])


def recomputed_generation(
    loaded: caa.LoadedModel, ids: list[int], layer: int, delta: torch.Tensor, steps: int
) -> tuple[list[int], torch.Tensor]:
    """The reference: greedy generation that runs the whole sequence, unpadded and without a cache, at
    every step, adding ``delta`` to block ``layer``'s output at every position after the prompt (the
    paper's ``position > instruction_end``). Returns the new tokens (up to and with EOS) and each
    step's float32 logits [steps, vocab]."""
    start = len(ids)

    def hook(module: Any, args: Any, output: Any) -> Any:
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[:, start:] += delta.to(hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    seq, logits = list(ids), []
    handle = loaded.blocks[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for _ in range(steps):
                step = loaded.model(torch.tensor([seq], device=loaded.device), use_cache=False).logits
                logits.append(step[0, -1].float().cpu())
                seq.append(int(logits[-1].argmax()))
                if seq[-1] == loaded.tokenizer.eos_token_id:
                    break
    finally:
        handle.remove()
    return seq[start:], torch.stack(logits)


@gpu
@pytest.mark.parametrize("name", MODELS)
def test_steered_generation_under_kv_cache_equals_recomputation(
    gpu_device: torch.device, gpu_models: dict[str, Path], gpu_pairs: caa.PairSet, name: str
) -> None:
    """Batched, left-padded generation with the KV cache under ``caa.steer`` (and ``caa.generate``),
    default ``answer`` policy, gives the tokens and logits of a recomputation without cache that steers
    the same positions; the first new token is unsteered, later ones are steered."""
    loaded = load(gpu_models[name], gpu_device)
    vectors = caa.compute_vectors(caa.extract(loaded, gpu_pairs, caa.ExtractOptions(split="train")))
    layer = loaded.num_layers // 2
    vector = vectors.tensor("mood", layer)
    rows = [(p, m) for p in PROMPTS for m in GEN_MULTIPLIERS]
    ids = {p: prompt_ids(loaded, p) for p in PROMPTS}
    batch = collate(
        [Encoded(ids[p], len(ids[p]), [len(ids[p]) - 1]) for p, _ in rows], loaded.tokenizer.pad_token_id
    )
    batch = batch.to(gpu_device)
    assert batch.attention_mask.sum(-1).unique().numel() == len(PROMPTS)  # padded rows
    with (
        torch.inference_mode(),
        caa.steer(
            loaded,
            vector,
            layer,
            [m for _, m in rows],
            positions="answer",
            prompt_length=[len(ids[p]) for p, _ in rows],
        ),
    ):
        out = loaded.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    cached_logits = torch.stack(out.logits, 1).float().cpu()  # [rows, steps, vocab]
    new = out.sequences[:, batch.input_ids.shape[1] :].cpu()
    texts = {}
    for r, (prompt, m) in enumerate(rows):
        tokens, logits = recomputed_generation(loaded, ids[prompt], layer, m * vector, NEW_TOKENS)
        n = len(tokens)
        assert new[r, :n].tolist() == tokens, f"{name}: {prompt!r} at multiplier {m}"
        torch.testing.assert_close(cached_logits[r, :n], logits, rtol=1e-4, atol=1e-4)
        texts[prompt, m] = loaded.tokenizer.decode(
            [t for t in tokens if t != loaded.tokenizer.eos_token_id], skip_special_tokens=True
        ).strip()
    # the answer policy: the first token comes from the unsteered prompt end, the next ones are steered
    per_prompt = cached_logits.view(len(PROMPTS), len(GEN_MULTIPLIERS), *cached_logits.shape[1:])
    torch.testing.assert_close(per_prompt[:, 0, 0], per_prompt[:, 1, 0], rtol=1e-5, atol=1e-5)
    assert (per_prompt[:, 0, 1] - per_prompt[:, 1, 1]).abs().amax() > 1e-2
    # and caa.generate, the API of `caa generate`, writes the same texts
    gens = caa.generate(
        loaded,
        vectors,
        PROMPTS,
        caa.GenerateOptions(
            layer=layer, multipliers=tuple(GEN_MULTIPLIERS), behavior="mood", max_new_tokens=NEW_TOKENS
        ),
    )
    for r in gens.frame.itertuples():
        assert r.text == texts[r.prompt, r.multiplier], f"{name}: {r.prompt!r} at multiplier {r.multiplier}"


# --- 4. out of memory in extract -----------------------------------------------------------------------


def check_oom_halving(
    monkeypatch: pytest.MonkeyPatch, directory: Path, pairs: caa.PairSet, device: torch.device
) -> None:
    """Extract at batch size 8 with batches over 2 rows failing: the batch halves twice, stays
    halved, and the activations are those of the run without errors (rows in the same order)."""
    loaded = load(directory, device)
    layers = list(range(loaded.num_layers))
    frame = pairs.frame.iloc[:12]  # 24 texts: three batches of 8
    clean = extract_in_memory(loaded, frame, caa.ExtractOptions(layers=tuple(layers), batch_size=8))
    sizes = inject_oom(monkeypatch, loaded, max_rows=2)
    notices: list[str] = []
    halved = extract_in_memory(
        loaded, frame, caa.ExtractOptions(layers=tuple(layers), batch_size=8), notice=notices.append
    )
    assert notices == [
        "CUDA out of memory at batch size 8; retrying at 4",
        "CUDA out of memory at batch size 4; retrying at 2",
    ]
    assert sizes[:2] == [8, 4] and all(s <= 2 for s in sizes[2:])  # halved for the rest of the run
    assert sum(sizes[2:]) == 2 * len(frame)  # every text once
    assert halved.keys.equals(clean.keys)
    # other batches, other padding: float32 sums in another order, not other numbers
    assert relative_error(halved.values, clean.values).max() < 1e-5


def test_oom_in_extract_halves_the_batch_on_cpu(
    monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path], gpu_pairs: caa.PairSet
) -> None:
    """The normal suite's version: the retry path does not need CUDA to run."""
    check_oom_halving(monkeypatch, tiny_models["llama"], gpu_pairs, torch.device("cpu"))


def test_oom_with_a_batch_of_one_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path], gpu_pairs: caa.PairSet
) -> None:
    loaded = load(tiny_models["llama"], torch.device("cpu"))
    sizes = inject_oom(monkeypatch, loaded, max_rows=0)
    with pytest.raises(caa.CaaError, match="out of GPU memory with a batch of one text"):
        extract_in_memory(loaded, gpu_pairs.frame, caa.ExtractOptions(layers=(0, 1), batch_size=4))
    assert sizes == [4, 2, 1]


@gpu
@pytest.mark.parametrize("name", MODELS)
def test_oom_in_extract_halves_the_batch(
    monkeypatch: pytest.MonkeyPatch,
    gpu_device: torch.device,
    gpu_models: dict[str, Path],
    gpu_pairs: caa.PairSet,
    name: str,
) -> None:
    check_oom_halving(monkeypatch, gpu_models[name], gpu_pairs, gpu_device)
