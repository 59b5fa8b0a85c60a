"""Benchmark `caa extract` against a bare batched forward, a naive per-pair loop and steering-vectors.

Ratios are measured in one process on the same pairs; nothing here is a test. Usage:
    python scripts/bench_extract.py [--pairs 96] [--batch-size 16] [--rss]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from caa.extract import batches_by_length, encode_pairs, extract_activations  # noqa: E402
from caa.ingest import ingest, pairs_table  # noqa: E402
from caa.models import load_model  # noqa: E402
from caa.prompts import collate, prompt_format  # noqa: E402


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def bare_forward(loaded, items, batch_size: int) -> None:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        for chunk in batches_by_length(items, batch_size):
            b = collate([it.encoded for it in chunk], loaded.tokenizer.pad_token_id)
            loaded.model.base_model(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                position_ids=b.position_ids,
                use_cache=False,
            )


def naive_loop(loaded, items, layers) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The paper's style: one text at a time, output_hidden_states=True, the whole model."""
    out = []
    with torch.inference_mode():
        for it in items:
            hs = loaded.model(torch.tensor([it.encoded.input_ids]), output_hidden_states=True).hidden_states
            out.append(torch.stack([hs[layer + 1][0, it.encoded.read].mean(0) for layer in layers]))
    return torch.stack(out).numpy()


def steering_vectors_bench(loaded, pairs, layers, batch_size):  # type: ignore[no-untyped-def]
    try:
        from steering_vectors import train_steering_vector
    except ImportError:
        return None
    style = prompt_format(loaded.tokenizer)
    samples = [
        (
            style.prefix(loaded.tokenizer, r.prompt) + r.positive,
            style.prefix(loaded.tokenizer, r.prompt) + r.negative,
        )
        for r in pairs.itertuples()
    ]
    seconds, sv = timed(
        lambda: train_steering_vector(
            loaded.model,
            loaded.tokenizer,
            samples,
            layers=layers,
            read_token_index=-1,
            batch_size=batch_size,
            show_progress=False,
        )
    )
    return seconds, {layer: sv.layer_activations[layer].float().numpy() for layer in layers}


def rss_child(n_pairs: int, model_dir: str, out: str) -> None:
    """Extract n synthetic free-form pairs with a tiny model, streaming to Parquet; print peak RSS."""
    from caa.cli import app  # noqa: F401  (the same code path as the CLI)
    from caa.extract import read_pairs, run_extract
    from caa.ingest import write_pairs

    tmp = Path(out).parent
    src = tmp / "synthetic.jsonl"
    with open(src, "w") as f:
        for i in range(n_pairs):
            f.write(
                json.dumps(
                    {
                        "prompt": f"Tell me about day {i}.",
                        "positive": f"Day {i} was a good day.",
                        "negative": f"Day {i} was a bad day.",
                    }
                )
                + "\n"
            )
    pairs = tmp / "pairs.parquet"
    write_pairs(ingest([src]), pairs, [src], {})
    loaded = load_model(model_dir, device="cpu")
    run_extract(read_pairs(pairs)[0], pairs, Path(out), loaded, "all", batch_size=64)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def rss_bench() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from tests.tiny_models import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_model("llama", Path(tmp) / "tiny")
        peaks = {}
        for n in (1000, 10000):
            work = Path(tmp) / str(n)
            work.mkdir()
            proc = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(n), str(model), str(work / "acts.parquet")],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks[n] = float(proc.stdout.strip().splitlines()[-1])
        print(
            f"peak RSS, tiny llama, all layers: 1k pairs {peaks[1000]:.0f} MiB, "
            f"10k pairs {peaks[10000]:.0f} MiB "
            f"(ratio {peaks[10000] / peaks[1000]:.3f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS at 1k and 10k pairs")
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1], args.rss_child[2])
        return
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m", device="cpu")
    result = ingest([ROOT / "data" / "sentiment.jsonl", ROOT / "data" / "sycophancy.json"])
    frame = pairs_table(result.pairs).to_pandas()
    frame = frame.groupby("behavior").head(args.pairs // 2).reset_index(drop=True)
    frame["split"] = frame["split"].astype(str)
    layers = list(range(loaded.num_layers))
    items = encode_pairs(frame, loaded, prompt_format(loaded.tokenizer), "last")
    tokens = sum(len(it.encoded.input_ids) for it in items)
    print(
        f"SmolLM2-135M on CPU ({torch.get_num_threads()} threads), {len(frame)} pairs = {len(items)} texts, "
        f"{tokens} tokens, batch size {args.batch_size}, all {len(layers)} layers"
    )
    bare_forward(loaded, items[:8], args.batch_size)  # warm-up
    t_bare, _ = timed(lambda: bare_forward(loaded, items, args.batch_size))
    t_caa, groups = timed(
        lambda: list(extract_activations(frame, loaded, layers, batch_size=args.batch_size))
    )
    t_naive, naive = timed(lambda: naive_loop(loaded, items, layers))
    print(f"bare batched forward : {tokens / t_bare:8.0f} tokens/s")
    print(f"caa extract          : {tokens / t_caa:8.0f} tokens/s  ({t_bare / t_caa:.3f}x bare forward)")
    print(f"naive per-text loop  : {tokens / t_naive:8.0f} tokens/s  (caa is {t_naive / t_caa:.2f}x faster)")
    # check agreement with the naive loop on the same texts
    acts = {}
    for g in groups:
        for pid, side, layer, vec in zip(g["pair_id"], g["side"], g["layer"], g["activation"], strict=True):
            acts[(pid, side, int(layer))] = vec
    ours = np.stack(
        [[acts[(frame.pair_id[it.pair_index], it.side, layer)] for layer in layers] for it in items]
    )
    # hidden_states of the last block is taken after the final norm: compare the blocks before it
    diff = np.abs(ours[:, :-1] - naive[:, :-1]).max()
    print(
        f"max |caa - naive| over layers 0-{layers[-2]}: {diff:.2e} "
        f"(relative {diff / np.abs(naive).max():.1e})"
    )
    sv = steering_vectors_bench(loaded, frame[frame.format == "freeform"], layers, args.batch_size)
    if sv is None:
        print(
            "steering-vectors: not installed "
            "(pip install --no-deps steering-vectors==0.12.2 scikit-learn tqdm)"
        )
    else:
        seconds, sv_vectors = sv
        ff = frame[frame.format == "freeform"]
        ff_tokens = sum(
            len(it.encoded.input_ids) for it in items if frame.format[it.pair_index] == "freeform"
        )
        t_ff, ff_groups = timed(
            lambda: list(
                extract_activations(ff.reset_index(drop=True), loaded, layers, batch_size=args.batch_size)
            )
        )
        print(
            f"steering-vectors     : {ff_tokens / seconds:8.0f} tokens/s  "
            f"(caa is {seconds / t_ff:.2f}x faster on the free-form pairs)"
        )
        keys = {k: np.concatenate([g[k] for g in ff_groups]) for k in ("side", "layer", "activation")}
        cos = []
        for layer in layers:
            pos = keys["activation"][(keys["side"] == "positive") & (keys["layer"] == layer)].mean(0)
            neg = keys["activation"][(keys["side"] == "negative") & (keys["layer"] == layer)].mean(0)
            v, w = pos - neg, sv_vectors[layer]
            cos.append(float(v @ w / np.linalg.norm(v) / np.linalg.norm(w)))
        print(
            f"cosine(caa vector, steering-vectors vector) over layers: min {min(cos):.5f}, "
            f"mean {np.mean(cos):.5f}"
        )
    if args.rss:
        rss_bench()


if __name__ == "__main__":
    main()
