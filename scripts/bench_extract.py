"""Extraction: `caa extract`'s code path against its limit (a bare batched forward over the same tokens,
no hooks) and its peers (the paper's one-text loop with output_hidden_states=True, and
steering-vectors' `train_steering_vector` when it is installed), all timed in one process on the
same pairs (built-in sentiment and sycophancy pairs, every layer). Also the achieved TFLOP/s, as a
fraction of the card's dense bf16 peak on a GPU we know.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from bench_common import Bench, Section, real_pairs

from caa.core.prompts import collate, prompt_format
from caa.stages.extract import batches_by_length, encode_pairs, extract_activations

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets. Matched in order
# against torch.cuda.get_device_name(): "NVIDIA H100 80GB HBM3" is the SXM card.
BF16_PEAKS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
)
SV_INSTALL = "pip install --no-deps steering-vectors==0.12.2 && pip install scikit-learn tqdm"


def bf16_peak(device_name: str) -> float | None:
    return next((peak for name, peak in BF16_PEAKS if name in device_name), None)


def forward_flops(loaded, lengths: list[int], n_layers: int) -> float:  # type: ignore[no-untyped-def]
    """Useful FLOPs of running texts of ``lengths`` through the first ``n_layers`` blocks (padding
    not counted): 2 x block parameters per token, plus causal attention's QK^T and AV,
    2 x 2 x d_model x (positions attended) per token."""
    block_params = sum(p.numel() for p in loaded.blocks[0].parameters())
    d = loaded.hidden_size
    per_layer = sum(2 * block_params * n + 4 * d * n * (n + 1) / 2 for n in lengths)
    return float(n_layers * per_layer)


def bare_forward(loaded, items, batch_size: int) -> None:  # type: ignore[no-untyped-def]
    """The limit: the same batches through the same blocks, no hooks, nothing read."""
    with torch.inference_mode():
        for chunk in batches_by_length(items, batch_size):
            b = collate([it.encoded for it in chunk], loaded.tokenizer.pad_token_id).to(loaded.device)
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
            ids = torch.tensor([it.encoded.input_ids], device=loaded.device)
            hs = loaded.model(ids, output_hidden_states=True).hidden_states
            out.append(torch.stack([hs[layer + 1][0, it.encoded.read].float().mean(0) for layer in layers]))
    return torch.stack(out).cpu().numpy()  # [texts, layers, d_model]


def steering_vectors_run(bench: Bench, frame, layers, batch_size):  # type: ignore[no-untyped-def]
    """(seconds, {layer: vector}) of steering-vectors on ``frame``, or None when not installed."""
    try:
        from steering_vectors import train_steering_vector
    except ImportError:
        return None
    tok = bench.loaded.tokenizer
    style = prompt_format(tok)
    samples = [
        (style.prefix(tok, r.prompt) + r.positive, style.prefix(tok, r.prompt) + r.negative)
        for r in frame.itertuples()
    ]
    seconds, sv = bench.timed(
        lambda: train_steering_vector(
            bench.loaded.model,
            tok,
            samples,
            layers=layers,
            read_token_index=-1,
            batch_size=batch_size,
            show_progress=False,
        )
    )
    return seconds, {layer: sv.layer_activations[layer].float().cpu().numpy() for layer in layers}


def caa_run(bench: Bench, frame, layers, batch_size):  # type: ignore[no-untyped-def]
    return bench.timed(lambda: list(extract_activations(frame, bench.loaded, layers, batch_size=batch_size)))


def run(bench: Bench) -> Section:
    loaded = bench.loaded
    per_behavior = bench.pick(8, 24, gpu=96)
    batch_size = 64 if bench.cuda else 16
    parts = [real_pairs(name).head(per_behavior) for name in ("sentiment", "sycophancy")]
    frame = pd.concat(parts, ignore_index=True)
    layers = list(range(loaded.num_layers))
    items = encode_pairs(frame, loaded, prompt_format(loaded.tokenizer), "last")
    lengths = [len(it.encoded.input_ids) for it in items]
    tokens = sum(lengths)
    section = Section(
        "extract",
        f"{len(frame)} pairs ({per_behavior} sentiment free-form + {per_behavior} sycophancy A/B) = "
        f"{len(items)} texts, {tokens} tokens, all {len(layers)} layers, batch size {batch_size}",
    )
    bare_forward(loaded, items[:batch_size], batch_size)  # warm-up
    t_bare, _ = bench.timed(lambda: bare_forward(loaded, items, batch_size))
    bench.log(f"extract: bare forward {tokens / t_bare:.0f} tokens/s")
    t_caa, groups = caa_run(bench, frame, layers, batch_size)
    bench.log(f"extract: caa {tokens / t_caa:.0f} tokens/s")
    style = prompt_format(loaded.tokenizer)
    t_encode, _ = bench.timed(lambda: encode_pairs(frame, loaded, style, "last"))
    t_naive, naive = bench.timed(lambda: naive_loop(loaded, items, layers), repeat=1)  # seconds long
    bench.log(f"extract: naive loop {tokens / t_naive:.0f} tokens/s")
    section.add("bare batched forward (the limit)", tokens / t_bare, "tokens/s")
    section.add("caa extract", tokens / t_caa, "tokens/s", "bare batched forward", t_bare / t_caa, True)
    # the bare forward is handed token ids; caa extract's time includes making them (on the CPU)
    section.add("of which templating + tokenising", t_encode / t_caa, "share of caa extract")
    section.add("naive one-text loop", tokens / t_naive, "tokens/s", "caa extract", t_caa / t_naive)
    section.add("caa extract speed-up", t_naive / t_caa, "x", "naive one-text loop", t_naive / t_caa, True)
    flops = forward_flops(loaded, lengths, len(layers))
    section.add("caa extract achieved", flops / t_caa / 1e12, "TFLOP/s")
    if bench.cuda:
        name = torch.cuda.get_device_name()
        peak = bf16_peak(name)
        if peak is None:
            section.notes.append(f"no dense bf16 peak on file for {name}: fraction of peak not reported")
        else:
            achieved = flops / t_caa / 1e12
            section.add(
                "share of dense bf16 peak",
                achieved / peak,
                "fraction",
                f"{name} {peak} TFLOP/s",
                achieved / peak,
                True,
            )
    section.notes.append(
        "TFLOP/s counts useful FLOPs: 2 x block parameters per token + causal attention "
        "(4 x d_model x attended positions per token), padding excluded"
    )
    acts = {}
    for g in groups:
        for pid, side, layer, vec in zip(g["pair_id"], g["side"], g["layer"], g["activation"], strict=True):
            acts[(pid, side, int(layer))] = vec
    ours = np.stack([[acts[(frame.pair_id[it.pair_index], it.side, la)] for la in layers] for it in items])
    # hidden_states of the last block is taken after the final norm: compare the blocks before it
    diff = float(np.abs(ours[:, :-1] - naive[:, :-1]).max())
    section.add("max |caa - naive| (layers before the last)", diff, "abs")
    # in bf16 a batched, padded pass rounds differently from a one-text pass: read it against the size
    section.add("the same, over max |naive|", diff / float(np.abs(naive[:, :-1]).max()), "relative")
    _peer(bench, section, frame, layers, batch_size)
    return section


def _peer(bench: Bench, section: Section, frame, layers, batch_size) -> None:  # type: ignore[no-untyped-def]
    """steering-vectors on the free-form pairs (it reads the last token; A/B reads the letter)."""
    ff = frame[frame.format == "freeform"].reset_index(drop=True)
    sv = steering_vectors_run(bench, ff, layers, batch_size)
    if sv is None:
        section.notes.append(f"steering-vectors: not installed ({SV_INSTALL})")
        bench.log("extract: steering-vectors not installed")
        return
    seconds, sv_vectors = sv
    t_ff, ff_groups = caa_run(bench, ff, layers, batch_size)
    ff_tokens = sum(int(n) for g in ff_groups for n in g["n_tokens"][:: len(layers)])
    section.add(
        "steering-vectors train_steering_vector",
        ff_tokens / seconds,
        "tokens/s",
        "caa extract",
        t_ff / seconds,
    )
    section.add(
        "caa extract vs steering-vectors", seconds / t_ff, "x", "steering-vectors", seconds / t_ff, True
    )
    keys = {k: np.concatenate([g[k] for g in ff_groups]) for k in ("side", "layer", "activation")}
    cos = []
    for layer in layers:
        pos = keys["activation"][(keys["side"] == "positive") & (keys["layer"] == layer)].mean(0)
        neg = keys["activation"][(keys["side"] == "negative") & (keys["layer"] == layer)].mean(0)
        v, w = pos - neg, sv_vectors[layer]
        cos.append(float(v @ w / np.linalg.norm(v) / np.linalg.norm(w)))
    section.add("min cosine(caa vector, steering-vectors vector)", min(cos), "cosine")
    section.notes.append(f"steering-vectors timed on the {len(ff)} free-form pairs ({ff_tokens} tokens)")
    bench.log(f"extract: steering-vectors {ff_tokens / seconds:.0f} tokens/s")
