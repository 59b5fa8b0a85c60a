"""`caa sweep`: the behavior score and the fluency cost of steering, per layer and multiplier.

Scores (on held-out pairs):
- A/B questions: p(matching letter) / (p(A) + p(B)) at the answer-letter position (the paper's).
- Free-form pairs: log p(positive completion) - log p(negative completion), given the prompt.
Fluency cost, measured where the steering acts: the mean KL divergence from the unsteered to the
steered next-token distribution, and the perplexity and its change, over the unsteered model's greedy
continuations of neutral prompts (``answer``, ``prompt-end``) or over neutral text (``all``).
Reliability: paired intervals of each gain, and each item's steerability (:mod:`caa.reliability`).

The engines that run the model live in :mod:`caa.engine`; this module builds their texts and turns
their output into the table, the recommendation and the plot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from caa.artifacts import PNG_SOFTWARE, SWEEP, SWEEP_ITEMS, Kind, make_meta, write_parquet
from caa.budget import Planner, planner_for
from caa.engine import (
    ScoreText,
    Tick,
    ab_scores,
    completion_logprobs,
    fluency_sums,
    run_grid,
    supports_prefix_cache,
)
from caa.errors import CaaError, InputError, MismatchError
from caa.extract import SIDES, describe_pair
from caa.hooks import STEER_POSITIONS, steer_start  # noqa: F401 (re-exported)
from caa.models import LoadedModel
from caa.prompts import Encoded, PromptFormat, collate, encode, fit_context, prompt_format, read_texts
from caa.reliability import paired_interval, sem, slopes, steerability
from caa.vectors import VectorSet

ENGINES = ("fast", "naive")


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
    for name in ("hidden_size", "weights_hash"):
        if made.get(name) != here[name]:
            raise MismatchError(
                f"{vectors.path}: field 'model.{name}' is {made.get(name)!r} but the loaded model "
                f"'{loaded.fingerprint.name}' has {here[name]!r}: these vectors were made with another model"
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


def ab_text(loaded: LoadedModel, style: PromptFormat, prompt: str, positive: str, negative: str) -> ScoreText:
    """The context up to the answer letter, read at its last position, and the two letters' token ids."""
    pos = encode(loaded.tokenizer, style, prompt, positive, "ab", "answer")
    neg = encode(loaded.tokenizer, style, prompt, negative, "ab", "answer")
    r = pos.read[0]
    if pos.input_ids[:r] != neg.input_ids[: neg.read[0]]:
        raise CaaError(f"the answer letters of {prompt[:40]!r}... tokenize into different contexts")
    targets = (pos.input_ids[r], neg.input_ids[neg.read[0]])
    return ScoreText(tuple(pos.input_ids[:r]), pos.completion_start, r - 1, 1, targets)


def freeform_text(loaded: LoadedModel, style: PromptFormat, prompt: str, completion: str) -> ScoreText:
    """Prompt and completion, read at every position that predicts a completion token."""
    enc = encode(loaded.tokenizer, style, prompt, completion, "freeform", "mean")
    start = enc.completion_start
    return ScoreText(tuple(enc.input_ids), start, start - 1, len(enc.input_ids) - start)


def _fit(text: ScoreText, limit: int | None, truncate: bool, what: str) -> tuple[ScoreText, bool]:
    """``text`` within the model's context (see :func:`caa.prompts.fit_context`)."""
    enc, cut = fit_context(Encoded(list(text.input_ids), text.prompt_length, []), limit, truncate, what)
    shift = len(text.input_ids) - len(enc.input_ids)
    return replace(
        text,
        input_ids=tuple(enc.input_ids),
        prompt_length=text.prompt_length - shift,
        read_from=text.read_from - shift,
    ), cut


def pair_texts(
    loaded: LoadedModel, style: PromptFormat, pairs: pd.DataFrame, truncate: bool, pairs_path: Path
) -> tuple[list[ScoreText], set[str]]:
    """The texts that score ``pairs`` of one behavior (one per A/B question, two per free-form pair:
    positive then negative), and the ids of the pairs ``truncate`` cut."""
    texts, cut = [], set()
    is_ab = bool((pairs.format == "ab").all())
    for r in pairs.itertuples():
        made = (
            [(ab_text(loaded, style, r.prompt, r.positive, r.negative), None)]
            if is_ab
            else [(freeform_text(loaded, style, r.prompt, getattr(r, s)), s) for s in SIDES]
        )
        for text, side in made:
            fitted, was_cut = _fit(text, loaded.context_length, truncate, describe_pair(r, side, pairs_path))
            texts.append(fitted)
            if was_cut:
                cut.add(r.pair_id)
    return texts, cut


CONTINUATION_TOKENS = 32


@torch.inference_mode()
def fluency_texts(
    loaded: LoadedModel,
    style: PromptFormat,
    neutral: Sequence[str],
    positions: str,
    source: str = "neutral texts",
    new_tokens: int = CONTINUATION_TOKENS,
    batch_size: int = 16,
) -> list[ScoreText]:
    """The texts the fluency cost reads, in the regime being swept.

    ``all``: each neutral text as it is, read at every position. ``answer`` and ``prompt-end``: each
    neutral text is a prompt (chat format where the model has one), which the unsteered model
    continues greedily for ``new_tokens`` tokens, once; the continuation is read teacher-forced, the
    prompt left unsteered. ``source`` names the texts in errors.
    """
    tok = loaded.tokenizer
    limit = loaded.context_length
    extra = 0 if positions == "all" else new_tokens
    encoded = []
    for number, text in enumerate(neutral, start=1):
        ids = tok(text)["input_ids"] if positions == "all" else _prompt_ids(tok, style, text)
        if limit is not None and len(ids) + extra > limit:
            grown = f" and its {extra}-token continuation" if extra else ""
            raise CaaError(
                f"{source}: text {number} is {len(ids)} tokens{grown}, longer than the model's context "
                f"of {limit}: shorten it"
            )
        encoded.append(ids)
    if positions == "all":
        texts = [ScoreText(tuple(ids), 0, 0, len(ids) - 1) for ids in encoded if len(ids) > 1]
    else:
        texts = _continue(loaded, encoded, new_tokens, batch_size)
    if not texts:
        raise CaaError(f"{source}: no text is long enough (two tokens or more) for the fluency cost")
    return texts


def _prompt_ids(tok: Any, style: PromptFormat, prompt: str) -> list[int]:
    return list(tok(style.prefix(tok, prompt), add_special_tokens=not style.chat)["input_ids"])


def _continue(
    loaded: LoadedModel, prompts: Sequence[list[int]], new_tokens: int, batch_size: int
) -> list[ScoreText]:
    """Each prompt with the unsteered model's greedy continuation (up to and with its first EOS)."""
    tok = loaded.tokenizer
    eos = tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    made: dict[int, ScoreText] = {}
    for at in range(0, len(order), batch_size):
        index = order[at : at + batch_size]
        batch = collate([Encoded(prompts[i], 0, [0]) for i in index], tok.pad_token_id).to(loaded.device)
        out = loaded.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=1,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        for i, row in zip(index, out[:, batch.input_ids.shape[1] :].tolist(), strict=True):
            new = row[: row.index(eos) + 1] if eos in row else row
            ids = prompts[i]
            made[i] = ScoreText(tuple(ids + new), len(ids), len(ids) - 1, len(new))
    return [made[i] for i in range(len(prompts))]


def read_neutral(path: Path, limit: int, positions: str = "all") -> list[str]:
    """Neutral texts: ``{"text": ...}`` objects for ``all``, ``{"prompt": ...}`` for the other
    policies (.jsonl; either field is accepted), one per line (.txt), or a column (.parquet)."""
    first, second = ("text", "prompt") if positions == "all" else ("prompt", "text")
    try:
        return read_texts(path, first)[:limit]
    except InputError as e:
        if path.suffix.lower() == ".txt" or e.field != first:
            raise
        return read_texts(path, second)[:limit]


def check_strength(
    vectors: dict[int, torch.Tensor], multipliers: Sequence[float], loaded: LoadedModel
) -> None:
    """Refuse (before any work) a multiplier and vector whose product overflows the model's dtype."""
    dtype = next(loaded.model.parameters()).dtype
    top = float(torch.finfo(dtype).max) ** 0.5  # norms square the residual: beyond this they overflow
    biggest = max(abs(m) for m in multipliers)
    for layer, vector in vectors.items():
        peak = biggest * float(vector.double().abs().max())
        if not math.isfinite(peak) or peak >= top:
            raise CaaError(
                f"--multipliers: x{biggest:g} times the layer-{layer} vector (largest entry "
                f"{float(vector.abs().max()):.3g}) is {peak:.3g}, beyond what {dtype} activations hold "
                f"(about {top:.3g}): lower the multipliers"
            )


@dataclass
class SweepResult:
    """The sweep's summary table (one row per behavior x layer x multiplier), its per-item table (one
    row per test pair x layer x multiplier), the recommendation per behavior, and what the fluency
    cost measured."""

    table: pd.DataFrame
    items: pd.DataFrame
    recommended: dict[str, tuple[int, float] | None]
    best: dict[str, tuple[int, float] | None] = field(default_factory=dict)  # within budget, reliable or not
    fluency: dict[str, Any] = field(default_factory=dict)


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
    max_anti: float | None = None,
    engine: str = "fast",
    truncate: bool = False,
    seed: int = 0,
    pairs_path: Path = Path("pairs"),
    neutral_source: str = "neutral texts",
    tick: Tick | None = None,
    notice: Callable[[str], None] | None = None,
) -> SweepResult:
    """Score every held-out pair of each behavior at every (layer, multiplier), with the fluency cost
    and the per-item reliability statistics.

    ``steer_positions``: ``answer`` (the paper's), ``prompt-end`` or ``all`` (:func:`caa.hooks.steer_start`).
    ``engine``: ``fast`` reuses each prompt's unsteered KV cache across the grid; ``naive`` runs one
    batched forward pass per (texts, layer), the reference. Both give the same table. Batches follow
    ``planner`` (default: the model's memory budget). Pairs that trained the vectors are refused
    (``pairs_path`` names their file in the message). ``seed`` seeds the bootstrap intervals.
    """
    planner = planner or planner_for(loaded)
    if engine not in ENGINES:
        raise CaaError(f"--engine '{engine}': use one of {', '.join(ENGINES)}")
    steer_start(steer_positions, 0)  # refuses an unknown policy
    if 0.0 not in multipliers:
        raise CaaError("the multipliers must include 0, the unsteered baseline")
    check_model(vectors, loaded)
    style = prompt_format(loaded.tokenizer, chat_template)
    check_template(vectors, style)
    check_held_out(vectors, pairs, pairs_path)
    grids = {}
    for behavior in behaviors:
        chosen = vectors.require(behavior, layers)
        grids[behavior] = {
            layer: torch.from_numpy(vectors.vector(behavior, layer).copy()) for layer in chosen
        }
        check_strength(grids[behavior], multipliers, loaded)
    if engine == "fast" and steer_positions != "all" and not supports_prefix_cache(loaded) and notice:
        notice(f"{loaded.fingerprint.architecture} has sliding-window layers: using the reference engine")
    fluent = fluency_texts(loaded, style, neutral, steer_positions, neutral_source)
    zero = list(multipliers).index(0.0)
    rows, items = [], []
    for behavior in behaviors:
        subset = pairs[pairs.behavior == behavior]
        if subset.empty:
            raise CaaError(f"no held-out pairs of behavior '{behavior}'")
        is_ab = bool((subset.format == "ab").all())
        texts, cut = pair_texts(loaded, style, subset, truncate, pairs_path)
        if cut and notice:
            notice(f"--truncate: cut the start of {len(cut)} of {len(subset)} '{behavior}' pairs")
        _warn_unsteerable(texts, steer_positions, behavior, notice)
        grid = grids[behavior]
        reduce = ab_scores if is_ab else completion_logprobs
        by_layer = run_grid(engine, loaded, texts, grid, multipliers, reduce, steer_positions, planner, tick)
        fluency = run_grid(
            engine, loaded, fluent, grid, multipliers, fluency_sums(zero), steer_positions, planner, tick
        )
        ids = list(subset.pair_id)
        for layer in grid:
            scores = by_layer[layer][..., 0]  # [texts, multipliers]
            if not is_ab:
                scores = scores[0::2] - scores[1::2]  # [pairs, multipliers]
            kl_sum, nll_sum, count = fluency[layer].sum(0).T  # each [multipliers]
            summary, per_item = summarise(
                behavior, layer, multipliers, scores, ids, "p_match" if is_ab else "logp_diff", seed
            )
            for row, kl, nll in zip(summary, kl_sum / count, nll_sum / count, strict=True):
                row.update(kl_mean=float(kl), perplexity=float(np.exp(nll)))
            for row in summary:
                row["perplexity_delta"] = row["perplexity"] - summary[zero]["perplexity"]
            rows += summary
            items.append(per_item)
    table = pd.DataFrame(rows)
    check_finite(table, ("score_mean", "delta", "kl_mean", "perplexity"))
    picks = {b: recommend(table, b, max_kl, max_anti) for b in behaviors}
    return SweepResult(
        table,
        pd.concat(items, ignore_index=True),
        {b: p[0] for b, p in picks.items()},
        {b: p[1] for b, p in picks.items()},
        {
            "kind": "text" if steer_positions == "all" else "continuation",
            "texts": len(fluent),
            "tokens": int(sum(t.reads for t in fluent)),
            "continuation_tokens": None if steer_positions == "all" else CONTINUATION_TOKENS,
            "source": neutral_source,
        },
    )


def _warn_unsteerable(
    texts: Sequence[ScoreText], positions: str, behavior: str, notice: Callable[[str], None] | None
) -> None:
    """Say when no read position of some texts is steered (e.g. an answer letter fused with the
    token before it): their scores cannot move under this policy."""
    first = steer_start(positions, torch.tensor([t.prompt_length for t in texts]))
    if first is None or notice is None:
        return
    stuck = sum(t.read_from + t.reads - 1 < int(s) for t, s in zip(texts, first.tolist(), strict=True))
    if stuck:
        notice(
            f"'{behavior}': {stuck} of {len(texts)} texts have no steered position before the token "
            f"they score under --steer-positions {positions}; their scores cannot move (try prompt-end)"
        )


def check_finite(table: pd.DataFrame, columns: Sequence[str]) -> None:
    """Refuse to store a table whose measured numbers overflowed (the steering was too strong)."""
    for column in columns:
        bad = table[~np.isfinite(table[column].astype(float))]
        if len(bad):
            r = bad.iloc[0]
            raise CaaError(
                f"layer {r.layer} x{r.multiplier:g} ({r.behavior}): field '{column}' is not finite: "
                "the steered activations overflowed; lower the multipliers"
            )


def summarise(
    behavior: str,
    layer: int,
    multipliers: Sequence[float],
    scores: np.ndarray,
    ids: Sequence[str],
    kind: str,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """One layer's rows of the summary table (statistics of ``scores`` [items, multipliers]) and its
    per-item rows. A statistic that needs two items (standard error, intervals) is nan with one."""
    zero = list(multipliers).index(0.0)
    means = scores.mean(0)
    sems = sem(scores)
    low, high = paired_interval(scores, zero)
    item_slopes = slopes(scores, multipliers)
    steer = steerability(item_slopes, ids, seed)
    summary = [
        {
            "behavior": behavior,
            "layer": layer,
            "multiplier": float(m),
            "score_kind": kind,
            "score_mean": float(means[j]),
            "score_sem": float(sems[j]),
            "n": scores.shape[0],
            "delta": float(means[j] - means[zero]),
            "delta_low": float(low[j]),
            "delta_high": float(high[j]),
            "slope_mean": steer.slope_mean,
            "slope_median": steer.slope_median,
            "anti_fraction": steer.anti_fraction,
            "anti_low": steer.anti_low,
            "anti_high": steer.anti_high,
            "backward_items": steer.backward,
        }
        for j, m in enumerate(multipliers)
    ]
    n, k = scores.shape
    per_item = pd.DataFrame(
        {
            "behavior": behavior,
            "layer": layer,
            "multiplier": np.tile(np.asarray(multipliers, dtype=np.float64), n),
            "pair_id": np.repeat(np.asarray(ids, dtype=object), k),
            "score": scores.reshape(-1),
            "slope": np.repeat(item_slopes, k),
        }
    )
    return summary, per_item


def recommend(
    table: pd.DataFrame, behavior: str, max_kl: float, max_anti: float | None = None
) -> tuple[tuple[int, float] | None, tuple[int, float] | None]:
    """(recommended, best): among the positive multipliers within the fluency budget (KL <= ``max_kl``,
    and with ``max_anti``, layers whose anti-steerable share is at most it), the cell with the largest
    gain whose paired 95% interval lies above zero; and the largest positive gain, reliable or not."""
    ok = table[(table.behavior == behavior) & (table.multiplier > 0) & (table.kl_mean <= max_kl)]
    if max_anti is not None:
        ok = ok[ok.anti_fraction <= max_anti]
    ok = ok[ok.delta > 0]

    def pick(rows: pd.DataFrame) -> tuple[int, float] | None:
        if rows.empty:
            return None
        best = rows.loc[rows.delta.idxmax()]
        return int(best.layer), float(best.multiplier)

    return pick(ok[ok.delta_low > 0]), pick(ok)


def write_sweep(
    result: SweepResult,
    out: Path,
    items_out: Path,
    options: dict[str, Any],
    inputs: dict[str, Path],
    loaded: LoadedModel,
    vectors: VectorSet,
) -> None:
    """The summary table into ``out`` and the per-item table into ``items_out``, as they are: the
    temporaries of ``atomic_paths``, committed together with the plot."""
    meta = make_meta(
        SWEEP,
        options,
        inputs=inputs,
        model=loaded.fingerprint.to_dict(),
        prompt=vectors.meta.get("prompt"),
        recommended={b: list(r) if r else None for b, r in result.recommended.items()},
        best_unreliable={b: list(r) if r else None for b, r in result.best.items()},
        fluency=result.fluency,
    )
    write_parquet(pa_table(result.table, SWEEP), out, SWEEP, meta)
    items_meta = {**meta, "kind": SWEEP_ITEMS.name}  # the same run: inputs hashed once
    write_parquet(pa_table(result.items, SWEEP_ITEMS), items_out, SWEEP_ITEMS, items_meta)


def pa_table(frame: pd.DataFrame, kind: Kind = SWEEP) -> Any:
    """``frame``'s columns of ``kind`` as an Arrow table (NaN becomes null)."""
    import pyarrow as pa

    return pa.Table.from_pandas(frame[[f.name for f in kind.fields]], preserve_index=False)


def fluency_label(fluency: dict[str, Any]) -> str:
    """What the KL column measured, in words."""
    if fluency.get("kind") == "continuation":
        return (
            f"on the unsteered model's {fluency.get('continuation_tokens')}-token greedy continuations "
            f"of {fluency.get('texts')} neutral prompts"
        )
    return f"on {fluency.get('texts')} neutral texts, every position"


def plot_sweep(result: SweepResult, out: Path, max_kl: float) -> None:
    """One row per behavior: score vs multiplier per layer (with standard errors), the KL cost, and
    the distribution of per-item slopes per layer (how many items steer backwards)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    behaviors = list(dict.fromkeys(result.table.behavior))
    fig, axes = plt.subplots(len(behaviors), 3, figsize=(16, 4.3 * len(behaviors)), squeeze=False)
    for (score_ax, kl_ax, slope_ax), behavior in zip(axes, behaviors, strict=True):
        part = result.table[result.table.behavior == behavior]
        for layer, g in part.groupby("layer"):
            score_ax.errorbar(
                g.multiplier,
                g.score_mean,
                yerr=g.score_sem.fillna(0),
                marker="o",
                capsize=3,
                label=f"layer {layer}",
            )
            kl_ax.plot(g.multiplier, g.kl_mean, marker="o", label=f"layer {layer}")
        kind = part.score_kind.iloc[0]
        score_ax.set_ylabel("p(matching answer)" if kind == "p_match" else "log p(pos) - log p(neg)")
        score_ax.set_title(f"{behavior}: score on held-out pairs (n={part.n.iloc[0]})", fontsize=10)
        kl_ax.axhline(max_kl, color="grey", linestyle="--", linewidth=1, label=f"--max-kl {max_kl}")
        continuation = result.fluency.get("kind") == "continuation"
        kl_ax.set_title(
            f"{behavior}: fluency cost on "
            + ("continuations of neutral prompts" if continuation else "neutral text"),
            fontsize=10,
        )
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
        _plot_slopes(slope_ax, result.items[result.items.behavior == behavior], part, behavior)
    fig.tight_layout()
    try:  # into ``out`` as it is: a temporary of ``atomic_paths``, committed with the table
        fig.savefig(out, dpi=110, format="png", metadata={"Software": PNG_SOFTWARE})
    finally:
        plt.close(fig)


def _plot_slopes(ax: Any, items: pd.DataFrame, part: pd.DataFrame, behavior: str) -> None:
    """Per layer, each item's slope (a dot) over a box of their distribution, with the share below 0."""
    per_item = items.drop_duplicates(["layer", "pair_id"])
    layers = sorted(per_item.layer.unique())
    data = [per_item[per_item.layer == layer].slope.dropna().to_numpy() for layer in layers]
    if not any(len(d) for d in data):
        ax.text(0.5, 0.5, "one multiplier: no slopes", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    ax.boxplot(data, positions=range(len(layers)), widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    labels = []
    for x, values in enumerate(data):
        ax.scatter(x + rng.uniform(-0.15, 0.15, len(values)), values, s=9, alpha=0.5, color="tab:blue")
        anti = part[part.layer == layers[x]].anti_fraction.iloc[0]
        labels.append(f"layer {layers[x]}" + (f"\n{anti:.0%} backwards" if anti == anti else ""))
    ax.axhline(0, color="tab:red", linewidth=1, linestyle=":")
    ax.set_xticks(range(len(layers)), labels)
    ax.set_ylabel("per-item slope: score change per unit multiplier")
    ax.set_title(f"{behavior}: per-item steerability (below 0: steers backwards)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
