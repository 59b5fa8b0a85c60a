"""`caa sweep`: the behavior score and the fluency cost of steering, per layer and multiplier.

Scores (on held-out pairs):
- A/B questions: p(matching letter) / (p(A) + p(B)) at the answer-letter position (the paper's).
- Free-form pairs: log p(positive completion) - log p(negative completion), given the prompt.
Fluency cost, measured where the steering acts: the mean KL divergence from the unsteered to the
steered next-token distribution, and the perplexity and its change, over the unsteered model's greedy
continuations of neutral prompts (``answer``, ``prompt-end``) or over neutral text (``all``).
Reliability: paired intervals of each gain, and each item's steerability (:mod:`caa.evaluation.reliability`).

The engines that run the model live in :mod:`caa.evaluation.engines`; this module builds their texts and turns
their output into the table, the recommendation and the plot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from caa.core.budget import Planner, planner_for
from caa.core.distributed import ONE, Shard
from caa.core.hooks import steer_start
from caa.core.prompts import Encoded, PromptFormat, encode, encode_many, fit_context, prompt_format
from caa.errors import CaaError, InputError
from caa.evaluation.engines import ScoreText, Tick, run_grid
from caa.evaluation.fluency import CONTINUATION_TOKENS, fluency_texts
from caa.evaluation.scoring import (
    ab_scores,
    check_finite,
    completion_logprobs,
    fluency_sums,
    recommend,
    summarise,
)
from caa.models.loading import LoadedModel
from caa.report.plots import plot_sweep
from caa.stages.checks import check_held_out, check_model, check_strength, check_template
from caa.stages.ingest import SIDES, describe_pair, select_pairs
from caa.stages.options import SweepOptions
from caa.stages.prompting import (
    SystemPrompts,
    comparisons,
    prompting_layers,
    prompting_meta,
    run_arms,
    system_prompts,
)
from caa.stages.vectors import VectorSet
from caa.store.artifacts import make_meta, read_artifact, read_meta, write_parquet
from caa.store.files import atomic_paths
from caa.store.outputs import side_effects_path, sweep_paths
from caa.store.schemas import SIDE_EFFECTS, SWEEP, SWEEP_ITEMS, Kind
from caa.store.text import same_name


def _remove_side_effects(path: Path) -> None:
    """Remove ``path`` if it is a side-effects file (anything else there is left alone)."""
    try:
        if path.is_file() and read_meta(path).get("kind") == SIDE_EFFECTS.name:
            path.unlink()
    except InputError:
        pass


def held_out(
    vectors: VectorSet,
    pairs: pd.DataFrame,
    pairs_path: Path,
    behaviors: Sequence[str] | None = None,
    max_pairs: int | None = None,
) -> tuple[list[str], pd.DataFrame]:
    """The behaviors to sweep (``behaviors``, default: those of both the vectors and the pairs) and
    their test pairs (at most ``max_pairs`` each), with errors naming both files."""
    names = [same_name(b) for b in behaviors or sorted(set(vectors.behaviors()) & set(pairs.behavior))]
    if not names:
        raise CaaError(f"{vectors.path} and {pairs_path} have no behavior in common")
    for name in names:
        vectors.require(name)
    test = select_pairs(pairs, pairs_path, "test", names)
    if max_pairs is not None:
        test = test.groupby("behavior", sort=False).head(max_pairs).reset_index(drop=True)
    return names, test


def sweep_work(
    vectors: VectorSet, test: pd.DataFrame, names: Sequence[str], layers: Sequence[int] | None, neutral: int
) -> int:
    """The texts a sweep scores, summed over the layers it sweeps (a free-form pair is two texts; the
    neutral texts count at every layer): the total its progress ``tick`` reaches."""
    total = 0
    for name in names:
        per_layer = texts_scored(test[test.behavior == name]) + neutral
        total += per_layer * len(vectors.require(name, layers))
    return total


def texts_scored(part: pd.DataFrame) -> int:
    """The texts scoring one behavior's pairs ``part`` takes per cell: one per A/B pair (read up to the
    answer letter), two per free-form pair (each completion)."""
    return len(part) * (1 if (part.format == "ab").all() else 2)


def ab_text(loaded: LoadedModel, style: PromptFormat, prompt: str, positive: str, negative: str) -> ScoreText:
    """The context up to the answer letter, read at its last position, and the two letters' token ids."""
    pos = encode(loaded.tokenizer, style, prompt, positive, "ab", "answer")
    return _ab(pos, encode(loaded.tokenizer, style, prompt, negative, "ab", "answer"), prompt)


def freeform_text(loaded: LoadedModel, style: PromptFormat, prompt: str, completion: str) -> ScoreText:
    """Prompt and completion, read at every position that predicts a completion token."""
    return _freeform(encode(loaded.tokenizer, style, prompt, completion, "freeform", "mean"))


def _ab(pos: Encoded, neg: Encoded, prompt: str) -> ScoreText:
    r = pos.read[0]
    if pos.input_ids[:r] != neg.input_ids[: neg.read[0]]:
        raise CaaError(f"the answer letters of {prompt[:40]!r}... tokenize into different contexts")
    targets = (pos.input_ids[r], neg.input_ids[neg.read[0]])
    return ScoreText(tuple(pos.input_ids[:r]), pos.completion_start, r - 1, 1, targets)


def _freeform(enc: Encoded) -> ScoreText:
    start = enc.completion_start
    return ScoreText(tuple(enc.input_ids), start, start - 1, len(enc.input_ids) - start)


def _fit(text: ScoreText, limit: int | None, truncate: bool, what: str) -> tuple[ScoreText, bool]:
    """``text`` within the model's context (see :func:`caa.core.prompts.fit_context`)."""
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
    rows = list(pairs.itertuples())
    fmt, position = ("ab", "answer") if is_ab else ("freeform", "mean")
    wanted = [(r.prompt, getattr(r, side), fmt, position) for r in rows for side in SIDES]
    encoded = encode_many(loaded.tokenizer, style, wanted)  # one tokeniser call; [pos, neg] per pair
    for r, pos, neg in zip(rows, encoded[0::2], encoded[1::2], strict=True):
        made = (
            [(_ab(pos, neg, r.prompt), None)]
            if is_ab
            else [(_freeform(enc), side) for enc, side in zip((pos, neg), SIDES, strict=True)]
        )
        for text, side in made:
            fitted, was_cut = _fit(text, loaded.context_length, truncate, describe_pair(r, side, pairs_path))
            texts.append(fitted)
            if was_cut:
                cut.add(r.pair_id)
    return texts, cut


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
    meta: dict[str, Any] = field(default_factory=dict)  # the provenance the files carry
    side_effects: pd.DataFrame | None = None  # off-target changes (caa.stages.side_effects)

    def save(self, out: Path | str) -> tuple[Path, Path, Path]:
        """Write the table (``out``), the per-item table (``STEM.items.parquet``) and the plot
        (``STEM.png``) together, and the side effects if measured (``STEM.side_effects.parquet``):
        all are replaced, or none. Side effects an earlier run wrote there are removed when this one
        measured none (they belong to the table replaced). Returns the first three's paths."""
        paths = sweep_paths(Path(out))
        options = self.meta.get("options") or {}
        side = [side_effects_path(paths[0])] if self.side_effects is not None else []
        with atomic_paths([*paths, *side]) as (table_tmp, items_tmp, plot_tmp, *side_tmp):
            write_parquet(pa_table(self.table, SWEEP), table_tmp, SWEEP, self.meta)
            items_meta = {**self.meta, "kind": SWEEP_ITEMS.name}  # the same run
            write_parquet(pa_table(self.items, SWEEP_ITEMS), items_tmp, SWEEP_ITEMS, items_meta)
            for tmp in side_tmp:
                side_meta = {**self.meta, "kind": SIDE_EFFECTS.name}
                write_parquet(pa_table(self.side_effects, SIDE_EFFECTS), tmp, SIDE_EFFECTS, side_meta)
            plot_sweep(
                unprompted(self.table),
                unprompted(self.items),
                self.recommended,
                plot_tmp,
                max_kl=float(options.get("max_kl", 0.5)),
                fluency_kind=self.fluency.get("kind"),
                residual=options.get("scale") == "residual",
            )
        if self.side_effects is None:
            _remove_side_effects(side_effects_path(paths[0]))
        return paths

    @classmethod
    def read(cls, path: Path | str) -> SweepResult:
        """A sweep's table (``path``) and, beside it, its per-item table."""
        art = read_artifact(Path(path), SWEEP)
        items = read_artifact(sweep_paths(Path(path))[1], SWEEP_ITEMS).table.to_pandas()
        meta = art.meta

        def cells(key: str) -> dict[str, tuple[int, float] | None]:
            return {b: (int(r[0]), float(r[1])) if r else None for b, r in (meta.get(key) or {}).items()}

        table = art.table.to_pandas()
        side = side_effects_path(Path(path))
        side_effects = None  # beside it, if written by the same run (an older run's is not this one's)
        if (
            side.exists()
            and {**(found := read_artifact(side, SIDE_EFFECTS)).meta, "kind": SWEEP.name} == meta
        ):
            side_effects = found.table.to_pandas()
        return cls(
            table,
            items,
            cells("recommended"),
            cells("best_unreliable"),
            meta.get("fluency") or {},
            meta,
            side_effects,
        )


def run_sweep(
    loaded: LoadedModel,
    vectors: VectorSet,
    pairs: pd.DataFrame,
    neutral: Sequence[str],
    options: SweepOptions,
    *,
    behaviors: Sequence[str],
    planner: Planner | None = None,
    pairs_path: Path = Path("pairs"),
    neutral_source: str = "neutral texts",
    provenance: dict[str, Any] | None = None,
    inputs: dict[str, Path] | None = None,
    tick: Tick | None = None,
    notice: Callable[[str], None] | None = None,
    shard: Shard = ONE,
    prompts: Mapping[str, SystemPrompts] | None = None,
) -> SweepResult:
    """Score every held-out pair of each behavior at every (layer, multiplier), with the fluency cost
    and the per-item reliability statistics.

    ``options`` (:class:`caa.stages.options.SweepOptions`) say what is swept; ``options.engine``
    ``fast`` reuses each prompt's unsteered KV cache across the grid, ``naive`` runs one batched
    forward pass per (texts, layer), the reference: both give the same table. Batches follow
    ``planner`` (default: the model's memory budget, or ``options.max_memory``). Pairs that trained
    the vectors are refused (``pairs_path`` names their file in the message). The options, the
    ``provenance`` given (what a command was told besides) and ``inputs`` (files, hashed) go into the
    result's metadata. Under ``shard`` (the
    processes of ``accelerate launch``) each process runs its share of the batches and every process
    returns the whole result, the one one process computes (:mod:`caa.core.distributed`).
    """
    planner = planner or planner_for(loaded, options.max_memory, options.batch_size)
    multipliers, steer_positions = list(options.multipliers), options.steer_positions
    layers = list(options.layers) if options.layers is not None else None
    check_model(vectors, loaded)
    style = prompt_format(loaded.tokenizer, options.chat_template)
    check_template(vectors, style)
    check_held_out(vectors, pairs, pairs_path, notice)
    if prompts is None:  # not found by a plan (caa.stages.plans.plan_sweep), which said its warnings
        prompts, prompt_warnings = (
            system_prompts(pairs, behaviors, options) if options.prompting else ({}, [])
        )
        for line in prompt_warnings if notice else []:
            notice(line)  # type: ignore[misc]
    grids = {}
    for behavior in behaviors:
        chosen = vectors.require(behavior, layers)
        grids[behavior] = {layer: vectors.tensor(behavior, layer, options.scale) for layer in chosen}
        check_strength(grids[behavior], multipliers, loaded)
        if behavior in prompts:
            prompting_layers(grids[behavior], behavior, options)  # refused before any work
    said: set[str] = set()

    def once(message: str) -> None:  # the engine speaks per text set; say each thing once
        if notice and message not in said:
            said.add(message)
            notice(message)

    fluent = fluency_texts(
        loaded, style, neutral, steer_positions, neutral_source, shard=shard, notice=notice
    )
    zero = list(multipliers).index(0.0)
    rows, items = [], []

    def score(
        subset: pd.DataFrame, fmt: PromptFormat, grid: dict[int, torch.Tensor]
    ) -> dict[int, np.ndarray]:
        """One behavior's per-item scores under ``fmt``: {layer: [pairs, multipliers]}."""
        behavior = str(subset.behavior.iloc[0])
        is_ab = bool((subset.format == "ab").all())
        texts, cut = pair_texts(loaded, fmt, subset, options.truncate, pairs_path)
        if cut and notice:
            notice(f"--truncate: cut the start of {len(cut)} of {len(subset)} '{behavior}' pairs")
        _warn_unsteerable(texts, steer_positions, behavior, once)
        reduce = ab_scores if is_ab else completion_logprobs
        by_layer = run_grid(
            options.engine,
            loaded,
            texts,
            grid,
            multipliers,
            reduce,
            steer_positions,
            planner,
            tick,
            once,
            shard,
        )
        scores = {layer: by_layer[layer][..., 0] for layer in grid}  # [texts, multipliers]
        return scores if is_ab else {layer: s[0::2] - s[1::2] for layer, s in scores.items()}  # [pairs, ...]

    for behavior in behaviors:
        subset = pairs[pairs.behavior == behavior]
        if subset.empty:
            raise CaaError(f"no held-out pairs of behavior '{behavior}'")
        is_ab = bool((subset.format == "ab").all())
        grid = grids[behavior]
        by_layer = score(subset, style, grid)
        costs = run_grid(
            options.engine,
            loaded,
            fluent,
            grid,
            multipliers,
            fluency_sums(zero),
            steer_positions,
            planner,
            tick,
            once,
            shard,
        )
        ids = list(subset.pair_id)
        for layer in grid:
            scores = by_layer[layer]  # [pairs, multipliers]
            kl_sum, nll_sum, count = costs[layer].sum(0).T  # each [multipliers]
            summary, per_item = summarise(
                behavior, layer, multipliers, scores, ids, "p_match" if is_ab else "logp_diff", options.seed
            )
            for row, kl, nll in zip(summary, kl_sum / count, nll_sum / count, strict=True):
                row.update(kl_mean=float(kl), perplexity=float(np.exp(nll)))
            for row in summary:
                row["perplexity_delta"] = row["perplexity"] - summary[zero]["perplexity"]
            rows += summary
            items.append(per_item)
    table = pd.DataFrame(rows).assign(system="none")
    per_item = pd.concat(items, ignore_index=True).assign(system="none")
    check_finite(table, ("score_mean", "delta", "kl_mean", "perplexity"))
    picks = {b: recommend(table, b, options.max_kl, options.max_anti) for b in behaviors}
    extra: dict[str, Any] = {}
    if prompts:  # the prompting arms: scores only (the fluency cost is arm none's)
        arm_rows, arm_items = run_arms(pairs, prompts, style, grids, score, options)
        check_finite(arm_rows, ("score_mean", "delta"))
        table = pd.concat([table, arm_rows], ignore_index=True)
        per_item = pd.concat([per_item, arm_items], ignore_index=True)
        compared = comparisons(table, per_item, prompts, picks, options)
        skipped = [b for b in behaviors if b not in prompts]
        extra["prompting"] = prompting_meta(prompts, skipped, compared, options.prompting_layer)
    fluency = {
        "kind": "text" if steer_positions == "all" else "continuation",
        "texts": len(fluent),
        "tokens": int(sum(t.reads for t in fluent)),
        "continuation_tokens": None if steer_positions == "all" else CONTINUATION_TOKENS,
        "source": neutral_source,
    }
    meta = make_meta(
        SWEEP,
        {**options.provenance(), "behaviors": list(behaviors), **(provenance or {})},
        inputs=inputs,
        model=loaded.fingerprint.to_dict(),
        prompt=vectors.meta.get("prompt"),
        recommended={b: list(p[0]) if p[0] else None for b, p in picks.items()},
        best_unreliable={b: list(p[1]) if p[1] else None for b, p in picks.items()},
        fluency=fluency,
        **extra,
    )
    recommended = {b: p[0] for b, p in picks.items()}
    best = {b: p[1] for b, p in picks.items()}
    return SweepResult(table, per_item, recommended, best, fluency, meta)


def unprompted(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of arm ``none`` (every row of a sweep run without the prompting arms)."""
    return frame[frame.system == "none"] if "system" in frame else frame


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


def pa_table(frame: pd.DataFrame, kind: Kind = SWEEP) -> Any:
    """``frame``'s columns of ``kind`` as an Arrow table (NaN becomes null)."""
    import pyarrow as pa

    return pa.Table.from_pandas(frame[[f.name for f in kind.fields]], preserve_index=False)
