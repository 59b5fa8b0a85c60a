"""What the engines' log-probabilities become: scores, the fluency cost, and the sweep's table.

Reductions (``ab_scores``, ``completion_logprobs``, ``fluency_sums``) turn a batch's log-probabilities
at the read positions into numbers per (text, multiplier), as tensor operations; :func:`summarise`
turns a layer's per-item scores into table rows with their statistics (:mod:`caa.evaluation.reliability`), and
:func:`recommend` picks a cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from caa.errors import CaaError
from caa.evaluation.engines import ScoreText
from caa.evaluation.reliability import paired_interval, sem, slopes, steerability


def ab_scores(texts: Sequence[ScoreText], logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """p(matching) / (p(matching) + p(other)) at the answer position: [texts, multipliers, 1]."""
    ids = torch.tensor([t.targets for t in texts], device=logp.device)  # [texts, 2]
    both = logp[:, :, 0].gather(-1, ids[:, None, :].expand(-1, logp.shape[1], -1)).exp()
    return (both[..., 0] / both.sum(-1))[..., None]


def _next_logp(texts: Sequence[ScoreText], logp: torch.Tensor) -> torch.Tensor:
    """log p (or the logit) of each read position's next token: [texts, multipliers, width]."""
    width = logp.shape[2]
    ids = torch.zeros((len(texts), width), dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, : t.reads] = torch.tensor(t.next_ids())
    index = ids.to(logp.device)[:, None, :, None].expand(-1, logp.shape[1], -1, 1)
    return logp.gather(-1, index).squeeze(-1)


def completion_logprobs(texts: Sequence[ScoreText], logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Summed log p of the tokens each text's read positions predict: [texts, multipliers, 1]."""
    return (_next_logp(texts, logp) * valid[:, None]).sum(-1, keepdim=True)


def fluency_sums(zero: int) -> FluencySums:
    """Per text and multiplier: the summed KL(unsteered || steered) over its read positions, the
    summed negative log-likelihood of the tokens they predict, and their count: [texts, mults, 3].
    The unsteered distribution is the multiplier-0 row (``zero``), computed in the same pass."""
    return FluencySums(zero)


class FluencySums:
    """The fluency reduction (:func:`fluency_sums`), also as a :class:`caa.evaluation.engines.SplitReduce`.

    On raw logits ``z`` (the fast engine), with ``p0`` the unsteered distribution of the same
    position, KL(p0 || p) = sum_v p0 log p0 - sum_v p0 z + logsumexp(z) sum_v p0: two passes over
    a steered cell's logits (a log-sum-exp and a dot product with ``p0``) instead of a log-softmax
    and its temporaries; ``p0`` and sum_v p0 log p0 are computed once per batch.
    """

    def __init__(self, zero: int):
        self.zero = zero

    def __call__(self, texts: Sequence[ScoreText], logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        base = logp[:, self.zero : self.zero + 1]  # [texts, 1, width, vocab]
        kl = (base.exp() * (base - logp)).sum(-1)  # [texts, multipliers, width]
        return _sums(kl, -_next_logp(texts, logp), valid)

    def unsteered(
        self, texts: Sequence[ScoreText], logits: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        z0 = logits.float()[:, None]  # [texts, 1, width, vocab]
        # log_softmax normalises with a plain float32 sum (off by several 1e-6 over 49k tokens);
        # logsumexp sums more exactly, as steered() does: the same normaliser on both sides of the KL
        logp0 = z0 - torch.logsumexp(z0, -1, keepdim=True)
        p0 = logp0.exp()
        nll = -_next_logp(texts, logp0)  # [texts, 1, width]
        state = (p0[:, 0], (p0 * logp0).sum(-1), p0.sum(-1))  # p0, sum p0 log p0, sum p0: [texts, 1, width]
        return _sums(torch.zeros_like(nll), nll, valid), state

    def steered(
        self,
        texts: Sequence[ScoreText],
        logits: torch.Tensor,
        valid: torch.Tensor,
        unsteered: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        p0, plogp0, mass = unsteered
        lse = torch.empty(logits.shape[:-1], device=logits.device)  # [texts, multipliers, width]
        cross = torch.empty_like(lse)  # sum_v p0 z
        # A few positions at a time (about 2 MB of logits): logsumexp makes four passes over its
        # input, which then stay in the CPU's cache, and the allocator reuses temporaries this small,
        # while a whole batch's (hundreds of MB) would be fresh pages, faulted in on every call.
        step = max(1, (2 << 20) // (logits.shape[1] * logits.shape[-1] * 4))
        for t in range(len(texts)):
            for at in range(0, logits.shape[2], step):
                z = logits[t, :, at : at + step].float()  # [multipliers, step, vocab]
                lse[t, :, at : at + step] = torch.logsumexp(z, -1)
                # not a matmul: BLAS dot products of this length are off by ~1e-5 and more
                cross[t, :, at : at + step] = (z * p0[t, at : at + step]).sum(-1)
        kl = plogp0 - cross + lse * mass
        nll = lse - _next_logp(texts, logits).float()
        return _sums(kl, nll, valid)


def _sums(kl: torch.Tensor, nll: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Summed KL, summed NLL and the count of the valid read positions: [texts, multipliers, 3]."""
    weights = valid[:, None].to(kl.dtype)
    count = weights.sum(-1).expand(-1, kl.shape[1])
    return torch.stack([(kl * weights).sum(-1), (nll * weights).sum(-1), count], -1)


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


def fluency_label(fluency: dict[str, Any]) -> str:
    """What the KL column measured, in words."""
    if fluency.get("kind") == "continuation":
        return (
            f"on the unsteered model's {fluency.get('continuation_tokens')}-token greedy continuations "
            f"of {fluency.get('texts')} neutral prompts"
        )
    return f"on {fluency.get('texts')} neutral texts, every position"
