"""`caa sweep`: the behavior score and the fluency cost of steering, per layer and multiplier.

Scores (on held-out pairs):
- A/B questions: p(matching letter) / (p(A) + p(B)) at the answer-letter position (the paper's).
- Free-form pairs: log p(positive completion) - log p(negative completion), given the prompt.
Fluency cost (on neutral text, every position steered): the mean KL divergence from the unsteered to
the steered next-token distribution, and the perplexity and its change.

This module is the reference engine: one batched forward pass per (texts, layer), multipliers riding
in the batch as per-row coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from caa.artifacts import SWEEP, atomic_path, make_meta, write_artifact
from caa.budget import Planner, planner_for
from caa.errors import CaaError, MismatchError
from caa.extract import SIDES, describe_pair
from caa.hooks import capturing, repeat_rows, replaying, run_until_stop, steering
from caa.models import LoadedModel
from caa.prompts import Encoded, PromptFormat, collate, encode, fit_context, prompt_format, read_texts
from caa.vectors import VectorSet

STEER_POSITIONS = ("answer", "all")
ENGINES = ("fast", "naive")
Tick = Callable[[int], None]


def parse_multipliers(spec: str, include_zero: bool = True) -> list[float]:
    """``-2,-1,0,1,2`` -> sorted floats; with ``include_zero`` 0 is added (the unsteered baseline)."""
    values = set()
    for part in spec.split(","):
        try:
            value = float(part)
        except ValueError:
            raise CaaError(f"--multipliers '{spec}': '{part.strip()}' is not a number") from None
        if not math.isfinite(value):
            raise CaaError(f"--multipliers '{spec}': '{part.strip()}' is not finite")
        values.add(value)
    if include_zero:
        values.add(0.0)
    return sorted(values)


def check_model(vectors: VectorSet, loaded: LoadedModel) -> None:
    """Refuse vectors made with another model or hidden size, naming the file and the field; and
    vectors whose width or layers do not fit the loaded model."""
    made = vectors.meta.get("model") or {}
    here = loaded.fingerprint.to_dict()
    for field in ("hidden_size", "weights_hash"):
        if made.get(field) != here[field]:
            raise MismatchError(
                f"{vectors.path}: field 'model.{field}' is {made.get(field)!r} but the loaded model "
                f"'{loaded.fingerprint.name}' has {here[field]!r}: these vectors were made with another model"
            )
    if vectors.values.shape[1] != loaded.hidden_size:
        raise MismatchError(
            f"{vectors.path}: field 'vector' has width {vectors.values.shape[1]} but the model's "
            f"hidden_size is {loaded.hidden_size}"
        )
    bad = vectors.frame.layer[(vectors.frame.layer < 0) | (vectors.frame.layer >= loaded.num_layers)]
    if len(bad):
        raise MismatchError(
            f"{vectors.path}: field 'layer': layer {bad.iloc[0]} is out of range; the model has "
            f"{loaded.num_layers} blocks (layers 0-{loaded.num_layers - 1})"
        )


def check_template(vectors: VectorSet, style: PromptFormat, option: str = "--chat-template") -> None:
    """Refuse to use vectors read under one prompt format with the other (chat template or plain)."""
    made = (vectors.meta.get("prompt") or {}).get("chat_template")
    if made is not None and bool(made) != style.chat:

        def name(chat: bool) -> str:
            return "the chat template" if chat else "plain text (no chat template)"

        raise MismatchError(
            f"{vectors.path}: field 'prompt.chat_template': its activations were read with "
            f"{name(bool(made))}, but this run uses {name(style.chat)}; set {option} to match"
        )


def check_held_out(vectors: VectorSet, pairs: pd.DataFrame, pairs_path: Path) -> None:
    """Refuse to score pairs that trained the vectors (another pairs file, or another split)."""
    trained = set(vectors.meta.get("train_pair_ids") or [])
    leaked = pairs.pair_id[pairs.pair_id.isin(trained)]
    if len(leaked):
        raise MismatchError(
            f"{pairs_path}: {len(leaked)} of its test pairs (e.g. '{leaked.iloc[0]}') trained the vectors "
            f"in {vectors.path} (field 'train_pair_ids'): score held-out pairs only"
        )


@dataclass(frozen=True)
class ScoreText:
    """One forward-pass text of the sweep, with the first steered position and what to read."""

    encoded: Encoded  # ids; for A/B the context ends just before the answer letter
    steer_start: int  # the last token of the prompt: it predicts the first answer token
    targets: tuple[int, ...]  # A/B: (matching letter id, other letter id); free-form: ()


def ab_text(loaded: LoadedModel, style: PromptFormat, prompt: str, positive: str, negative: str) -> ScoreText:
    """The context up to the answer letter, and the two letters' token ids."""
    pos = encode(loaded.tokenizer, style, prompt, positive, "ab", "answer")
    neg = encode(loaded.tokenizer, style, prompt, negative, "ab", "answer")
    r = pos.read[0]
    if pos.input_ids[:r] != neg.input_ids[: neg.read[0]]:
        raise CaaError(f"the answer letters of {prompt[:40]!r}... tokenize into different contexts")
    context = Encoded(pos.input_ids[:r], pos.completion_start, [r - 1])
    return ScoreText(context, pos.completion_start - 1, (pos.input_ids[r], neg.input_ids[neg.read[0]]))


def freeform_text(loaded: LoadedModel, style: PromptFormat, prompt: str, completion: str) -> ScoreText:
    enc = encode(loaded.tokenizer, style, prompt, completion, "freeform", "mean")
    return ScoreText(enc, enc.completion_start - 1, ())


@torch.inference_mode()
def _steered_logits(
    loaded: LoadedModel,
    texts: Sequence[ScoreText],
    deltas: torch.Tensor | None,
    layer: int,
    keep: int,
    steer_all: bool,
    skip: Any = None,
) -> torch.Tensor:
    """Log-probabilities of the last ``keep`` positions of each row: float32 [rows, keep, vocab].

    ``deltas`` None runs unsteered; ``skip``, the recorded output of block ``layer - 1``, replaces
    the blocks below ``layer``.
    """
    batch = collate([t.encoded for t in texts], loaded.tokenizer.pad_token_id).to(loaded.device)
    start = (
        None
        if steer_all
        else batch.offsets + torch.tensor([t.steer_start for t in texts], device=loaded.device)
    )
    steer = steering(loaded.blocks, {layer: deltas}, start) if deltas is not None else nullcontext()
    replay = replaying(loaded.blocks, layer, skip) if skip is not None else nullcontext()
    with replay, steer:
        logits = loaded.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=keep,
        ).logits
    return torch.log_softmax(logits.float(), dim=-1)


def score_rows(
    loaded: LoadedModel,
    texts: Sequence[ScoreText],
    layer: int,
    vector: torch.Tensor,
    multipliers: Sequence[float],
    planner: Planner | None = None,
    steer_all: bool = False,
    tick: Tick | None = None,
) -> np.ndarray:
    """Each text's score under each multiplier: float64 [texts, multipliers].

    A/B texts score p(matching) / (p(matching) + p(other)); free-form texts score the summed
    log-probability of their completion tokens. Batches follow ``planner`` (default: the model's
    memory budget).
    """
    m = torch.tensor(list(multipliers), dtype=torch.float32)
    planner = planner or planner_for(loaded)
    out = np.zeros((len(texts), len(multipliers)))
    lengths = [len(t.encoded.input_ids) for t in texts]
    for index in planner.batches(lengths, len(multipliers), keep_all=not (texts and texts[0].targets)):
        chunk = [texts[i] for i in index for _ in multipliers]  # rows: text-major, multiplier-minor
        deltas = m.repeat(len(index))[:, None] * vector  # [rows, d_model]
        if chunk[0].targets:
            logp = _steered_logits(loaded, chunk, deltas, layer, 1, steer_all)[:, -1]  # [rows, vocab]
            ids = torch.tensor([t.targets for t in chunk], device=logp.device)  # [rows, 2]
            both = logp.gather(1, ids).exp()
            scores = both[:, 0] / both.sum(1)
        else:
            scores = _completion_logprob(loaded, chunk, deltas, layer, steer_all)
        out[index] = scores.double().cpu().numpy().reshape(len(index), len(multipliers))
        if tick:
            tick(len(index))
    return out


def supports_prefix_cache(loaded: LoadedModel) -> bool:
    """Whether the prefix-cache engine is exact for this model: full attention in every layer.

    Sliding-window layers keep only part of the prefix in their cache, so those models use the
    reference engine."""
    config = loaded.model.config.get_text_config()
    types = getattr(config, "layer_types", None) or []
    return not any("sliding" in str(t) for t in types) and not getattr(config, "sliding_window", None)


@torch.inference_mode()
def score_grid_cached(
    loaded: LoadedModel,
    texts: Sequence[ScoreText],
    vectors: dict[int, torch.Tensor],
    multipliers: Sequence[float],
    planner: Planner | None = None,
    tick: Tick | None = None,
) -> dict[int, np.ndarray]:
    """Like :func:`score_rows` for every layer, computing what steering cannot change once.

    Positions before each text's first steered position are the same in every cell of the grid
    (causal attention): they run once per text, unsteered, and their KV cache is reused for every
    (layer, multiplier); only the steered tail runs per cell, multipliers in the batch dimension.
    """
    import copy
    import inspect

    m = torch.tensor(list(multipliers), dtype=torch.float32)
    planner = planner or planner_for(loaded)
    lengths = [len(t.encoded.input_ids) for t in texts]
    out = {layer: np.zeros((len(texts), len(multipliers))) for layer in vectors}
    device = loaded.device
    pad = loaded.tokenizer.pad_token_id
    # transformers renamed past_key_values to cache during 5.x: use the model's own name
    cache_kwarg = (
        "cache" if "cache" in inspect.signature(loaded.model.forward).parameters else "past_key_values"
    )
    for index in planner.batches(lengths, len(multipliers), keep_all=not (texts and texts[0].targets)):
        chunk = [texts[i] for i in index]
        heads = [t.encoded.input_ids[: t.steer_start] for t in chunk]
        tails = [t.encoded.input_ids[t.steer_start :] for t in chunk]
        p_len, s_len = max(map(len, heads)), max(map(len, tails))
        head_ids = torch.full((len(chunk), p_len), pad, dtype=torch.long)
        head_mask = torch.zeros((len(chunk), p_len), dtype=torch.long)
        tail_ids = torch.full((len(chunk), s_len), pad, dtype=torch.long)
        tail_mask = torch.zeros((len(chunk), s_len), dtype=torch.long)
        for r, (h, t) in enumerate(zip(heads, tails, strict=True)):
            head_ids[r, p_len - len(h) :] = torch.tensor(h)  # prefix padded on the left
            head_mask[r, p_len - len(h) :] = 1
            tail_ids[r, : len(t)] = torch.tensor(t)  # steered tail padded on the right
            tail_mask[r, : len(t)] = 1
        head_pos = (head_mask.cumsum(-1) - 1).clamp(min=0)
        tail_pos = head_mask.sum(-1, keepdim=True) + torch.arange(s_len)[None, :]
        first = loaded.model(
            input_ids=head_ids.to(device),
            attention_mask=head_mask.to(device),
            position_ids=head_pos.to(device),
            use_cache=True,
            logits_to_keep=1,
        )
        prefix = first.get("cache") or first.get("past_key_values")
        reps = len(multipliers)
        mask = torch.cat([head_mask, tail_mask], 1).to(device)
        # Blocks below layer l are unsteered: run the tail through them once, recording the input of
        # every block l of the grid, and skip them in the steered passes.
        inputs_of = [layer - 1 for layer in vectors if layer > 0]
        with capturing(loaded.blocks, inputs_of) as below:
            run_until_stop(
                loaded.model,
                input_ids=tail_ids.to(device),
                attention_mask=mask,
                position_ids=tail_pos.to(device),
                use_cache=True,
                **{cache_kwarg: copy.deepcopy(prefix)},
            )
        mask = mask.repeat_interleave(reps, 0)
        for layer, vector in vectors.items():
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(reps)
            deltas = m.repeat(len(chunk))[:, None] * vector  # [rows, d_model], text-major
            skip = (
                replaying(loaded.blocks, layer, repeat_rows(below[layer - 1], reps))
                if layer
                else nullcontext()
            )
            with skip, steering(loaded.blocks, {layer: deltas}, None):  # every tail position is steered
                logits = loaded.model(
                    input_ids=tail_ids.repeat_interleave(reps, 0).to(device),
                    attention_mask=mask,
                    position_ids=tail_pos.repeat_interleave(reps, 0).to(device),
                    use_cache=True,
                    **{cache_kwarg: cache},
                ).logits
            logp = torch.log_softmax(logits.float(), -1)  # [rows, tail, vocab]
            scores = _tail_scores(chunk, tails, logp, reps)
            out[layer][index] = scores.double().cpu().numpy().reshape(len(index), reps)
        if tick:
            tick(len(index) * len(vectors))
    return out


def _tail_scores(
    chunk: Sequence[ScoreText], tails: Sequence[list[int]], logp: torch.Tensor, reps: int
) -> torch.Tensor:
    """Scores from the tail log-probabilities: rows are text-major, ``reps`` multipliers each."""
    scores = torch.zeros(logp.shape[0], device=logp.device)
    for r in range(logp.shape[0]):
        text, tail = chunk[r // reps], tails[r // reps]
        if text.targets:
            both = logp[r, len(tail) - 1, list(text.targets)].exp()
            scores[r] = both[0] / both.sum()
        else:
            first = (
                text.encoded.completion_start - text.steer_start
            )  # tail index of the first completion token
            target = torch.tensor(tail[first:], device=logp.device)
            scores[r] = logp[r, first - 1 : len(tail) - 1].gather(1, target[:, None]).sum()
    return scores


def _completion_logprob(
    loaded: LoadedModel, rows: Sequence[ScoreText], deltas: torch.Tensor, layer: int, steer_all: bool
) -> torch.Tensor:
    """Summed log p of each row's completion tokens (they end each left-padded row)."""
    n = [len(t.encoded.input_ids) - t.encoded.completion_start for t in rows]
    keep = max(n) + 1
    logp = _steered_logits(loaded, rows, deltas, layer, keep, steer_all)  # [rows, keep, vocab]
    total = torch.zeros(len(rows), device=logp.device)
    for r, (t, k) in enumerate(zip(rows, n, strict=True)):
        target = torch.tensor(t.encoded.input_ids[-k:], device=logp.device)
        total[r] = logp[r, keep - 1 - k : keep - 1].gather(1, target[:, None]).sum()
    return total


def fluency_grid(
    loaded: LoadedModel,
    texts: Sequence[list[int]],
    vectors: dict[int, torch.Tensor],
    multipliers: Sequence[float],
    planner: Planner | None = None,
    fast: bool = True,
    tick: Tick | None = None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per layer and multiplier: mean KL(unsteered || steered) per token, and perplexity, with every
    position steered.

    ``fast`` runs each batch of texts once unsteered (the baseline distribution, and the input of
    every grid layer's block) and then only blocks l..L-1 per layer; otherwise every row runs the
    whole model and the baseline is the multiplier-0 row.
    """
    m = torch.tensor(list(multipliers), dtype=torch.float32)
    zero = list(multipliers).index(0.0)
    sums = {layer: (np.zeros(len(m)), np.zeros(len(m))) for layer in vectors}
    count = 0
    planner = planner or planner_for(loaded)
    for index in planner.batches([len(ids) for ids in texts], len(multipliers), keep_all=True):
        chunk = [texts[i] for i in index]
        width = max(len(ids) for ids in chunk)
        mask = torch.zeros(len(chunk), width - 1, device=loaded.device)
        targets = torch.zeros(len(chunk), width - 1, dtype=torch.long, device=loaded.device)
        for i, ids in enumerate(chunk):  # left-padded: the text fills the last len(ids) positions
            mask[i, width - len(ids) :] = 1
            targets[i, width - len(ids) :] = torch.tensor(ids[1:])
        count += int(mask.sum())
        plain = [ScoreText(Encoded(ids, 0, [0]), 0, ()) for ids in chunk]
        below: dict[int, Any] = {}
        base = None
        if fast:
            with capturing(loaded.blocks, [layer - 1 for layer in vectors if layer > 0], stop=False) as below:
                base = _steered_logits(loaded, plain, None, 0, width, True)[:, None, :-1]
        rows = [t for t in plain for _ in multipliers]
        for layer, vector in vectors.items():
            skip = repeat_rows(below[layer - 1], len(m)) if fast and layer > 0 else None
            logp = _steered_logits(
                loaded, rows, m.repeat(len(chunk))[:, None] * vector, layer, width, True, skip
            )
            pred = logp.view(len(chunk), len(m), width, -1)[:, :, :-1]  # position t predicts token t + 1
            ref = base if base is not None else pred[:, zero : zero + 1]  # [texts, 1, seq - 1, vocab]
            kl = (ref.exp() * (ref - pred)).sum(-1)  # [texts, multipliers, seq - 1]
            nll = -pred.gather(-1, targets[:, None, :, None].expand(-1, len(m), -1, 1)).squeeze(-1)
            sums[layer][0][:] += (kl * mask[:, None]).sum((0, 2)).double().cpu().numpy()
            sums[layer][1][:] += (nll * mask[:, None]).sum((0, 2)).double().cpu().numpy()
        if tick:
            tick(len(chunk) * len(vectors))
    return {layer: (kl_sum / count, np.exp(nll_sum / count)) for layer, (kl_sum, nll_sum) in sums.items()}


def read_neutral(path: Path, limit: int) -> list[str]:
    """Neutral texts (.jsonl of {"text": ...}, .txt with one per line, or .parquet with a text column)."""
    return read_texts(path, "text")[:limit]


@dataclass
class SweepResult:
    table: pd.DataFrame
    recommended: dict[str, tuple[int, float] | None]


def run_sweep(
    loaded: LoadedModel,
    vectors: VectorSet,
    pairs: pd.DataFrame,
    neutral: Sequence[str],
    *,
    behaviors: Sequence[str],
    layers: Sequence[int] | None,
    multipliers: Sequence[float],
    chat_template: str = "auto",
    steer_positions: str = "answer",
    planner: Planner | None = None,
    max_kl: float = 0.5,
    engine: str = "fast",
    truncate: bool = False,
    pairs_path: Path = Path("pairs"),
    tick: Tick | None = None,
    notice: Callable[[str], None] | None = None,
) -> SweepResult:
    """Score every held-out pair of each behavior at every (layer, multiplier), with the fluency cost.

    ``engine``: ``fast`` reuses each prompt's unsteered KV cache across the grid; ``naive`` runs one
    batched forward pass per (texts, layer), the reference. Both give the same table. Batches follow
    ``planner`` (default: the model's memory budget, :func:`caa.budget.planner_for`). Pairs that
    trained the vectors are refused (``pairs_path`` names their file in the message).
    """
    planner = planner or planner_for(loaded)
    if engine not in ENGINES:
        raise CaaError(f"--engine '{engine}': use one of {', '.join(ENGINES)}")
    skip_layers = engine == "fast"  # skipping unsteered blocks needs no cache: exact for every model
    if engine == "fast" and steer_positions == "all":
        engine = "naive"  # every position steered: there is no unsteered prefix to reuse
    if engine == "fast" and not supports_prefix_cache(loaded):
        engine = "naive"
        if notice:
            notice(f"{loaded.fingerprint.architecture} has sliding-window layers: using the reference engine")
    if steer_positions not in STEER_POSITIONS:
        raise CaaError(f"--steer-positions '{steer_positions}': use one of {', '.join(STEER_POSITIONS)}")
    check_model(vectors, loaded)
    style = prompt_format(loaded.tokenizer, chat_template)
    check_template(vectors, style)
    check_held_out(vectors, pairs, pairs_path)
    neutral_ids = [loaded.tokenizer(t)["input_ids"] for t in neutral]
    rows = []
    for behavior in behaviors:
        subset = pairs[pairs.behavior == behavior]
        if subset.empty:
            raise CaaError(f"no held-out pairs of behavior '{behavior}'")
        is_ab = bool((subset.format == "ab").all())
        texts, cut = [], set()
        for r in subset.itertuples():
            made = (
                [(ab_text(loaded, style, r.prompt, r.positive, r.negative), None)]
                if is_ab
                else [(freeform_text(loaded, style, r.prompt, getattr(r, s)), s) for s in SIDES]
            )
            for text, side in made:
                enc, was_cut = fit_context(
                    text.encoded, loaded.context_length, truncate, describe_pair(r, side, pairs_path)
                )
                shift = len(text.encoded.input_ids) - len(enc.input_ids)
                texts.append(ScoreText(enc, text.steer_start - shift, text.targets))
                if was_cut:
                    cut.add(r.pair_id)
        if cut and notice:
            notice(f"--truncate: cut the start of {len(cut)} of {len(subset)} '{behavior}' pairs")
        chosen = vectors.require(behavior, layers)
        grid = {layer: torch.from_numpy(vectors.vector(behavior, layer).copy()) for layer in chosen}
        if engine == "fast" and all(t.steer_start > 0 for t in texts):
            by_layer = score_grid_cached(loaded, texts, grid, multipliers, planner, tick)
        else:
            steer_all = steer_positions == "all"
            by_layer = {
                layer: score_rows(loaded, texts, layer, v, multipliers, planner, steer_all, tick)
                for layer, v in grid.items()
            }
        fluency = fluency_grid(loaded, neutral_ids, grid, multipliers, planner, skip_layers, tick)
        for layer in grid:
            scores = by_layer[layer]
            if not is_ab:
                scores = scores[0::2] - scores[1::2]  # [pairs, multipliers]
            kl, ppl = fluency[layer]
            rows += _summaries(
                behavior, layer, multipliers, scores, "p_match" if is_ab else "logp_diff", kl, ppl
            )
    table = pd.DataFrame(rows)
    return SweepResult(table, {b: recommend(table, b, max_kl) for b in behaviors})


def _summaries(
    behavior: str,
    layer: int,
    multipliers: Sequence[float],
    scores: np.ndarray,
    kind: str,
    kl: np.ndarray,
    ppl: np.ndarray,
) -> list[dict[str, Any]]:
    n = scores.shape[0]
    means = scores.mean(0)
    sems = scores.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.full(len(multipliers), np.nan)
    zero = list(multipliers).index(0.0)
    return [
        {
            "behavior": behavior,
            "layer": layer,
            "multiplier": float(m),
            "score_kind": kind,
            "score_mean": float(means[j]),
            "score_sem": float(sems[j]),
            "n": n,
            "delta": float(means[j] - means[zero]),
            "kl_mean": float(kl[j]),
            "perplexity": float(ppl[j]),
            "perplexity_delta": float(ppl[j] - ppl[zero]),
        }
        for j, m in enumerate(multipliers)
    ]


def recommend(table: pd.DataFrame, behavior: str, max_kl: float) -> tuple[int, float] | None:
    """The (layer, positive multiplier) with the largest score gain whose KL stays under ``max_kl``."""
    ok = table[
        (table.behavior == behavior) & (table.multiplier > 0) & (table.kl_mean <= max_kl) & (table.delta > 0)
    ]
    if ok.empty:
        return None
    best = ok.loc[ok.delta.idxmax()]
    return int(best.layer), float(best.multiplier)


def write_sweep(
    result: SweepResult,
    out: Path,
    options: dict[str, Any],
    inputs: dict[str, Path],
    loaded: LoadedModel,
    vectors: VectorSet,
) -> None:
    meta = make_meta(
        SWEEP,
        options,
        inputs=inputs,
        model=loaded.fingerprint.to_dict(),
        prompt=vectors.meta.get("prompt"),
        recommended={b: list(r) if r else None for b, r in result.recommended.items()},
    )
    write_artifact(pa_table(result.table), out, SWEEP, meta)


def pa_table(frame: pd.DataFrame) -> Any:
    import pyarrow as pa

    return pa.Table.from_pandas(frame[[f.name for f in SWEEP.fields]], preserve_index=False)


def plot_sweep(result: SweepResult, out: Path, max_kl: float) -> None:
    """Score vs multiplier per layer (with standard errors) beside the KL cost, one row per behavior."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    behaviors = list(dict.fromkeys(result.table.behavior))
    fig, axes = plt.subplots(len(behaviors), 2, figsize=(11, 4 * len(behaviors)), squeeze=False)
    for (score_ax, kl_ax), behavior in zip(axes, behaviors, strict=True):
        part = result.table[result.table.behavior == behavior]
        for layer, g in part.groupby("layer"):
            score_ax.errorbar(
                g.multiplier, g.score_mean, yerr=g.score_sem, marker="o", capsize=3, label=f"layer {layer}"
            )
            kl_ax.plot(g.multiplier, g.kl_mean, marker="o", label=f"layer {layer}")
        kind = part.score_kind.iloc[0]
        score_ax.set_ylabel("p(matching answer)" if kind == "p_match" else "log p(pos) - log p(neg)")
        score_ax.set_title(f"{behavior}: behavior score on held-out pairs (n={part.n.iloc[0]})")
        kl_ax.axhline(max_kl, color="grey", linestyle="--", linewidth=1, label=f"--max-kl {max_kl}")
        kl_ax.set_title(f"{behavior}: fluency cost on neutral text")
        kl_ax.set_ylabel("mean KL(unsteered || steered), nats/token")
        kl_ax.set_yscale("symlog", linthresh=0.01)
        kl_ax.set_ylim(bottom=0)
        pick = result.recommended.get(behavior)
        if pick:
            row = part[(part.layer == pick[0]) & (part.multiplier == pick[1])].iloc[0]
            score_ax.scatter(
                [pick[1]],
                [row.score_mean],
                s=250,
                facecolors="none",
                edgecolors="red",
                label=f"recommended: layer {pick[0]}, x{pick[1]:g}",
            )
        for ax in (score_ax, kl_ax):
            ax.set_xlabel("multiplier")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(out)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
