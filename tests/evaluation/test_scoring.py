"""caa.evaluation.scoring: the reductions of log-probabilities to scores and the fluency cost, the
summary rows and the recommendation, each against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from caa.errors import CaaError
from caa.evaluation.engines import ScoreText
from caa.evaluation.scoring import (
    ab_scores,
    check_finite,
    completion_logprobs,
    fluency_label,
    fluency_sums,
    recommend,
    summarise,
)


def test_ab_scores_is_p_match_over_p_a_plus_p_b() -> None:
    p = torch.tensor([[0.5, 0.2, 0.1, 0.2], [0.1, 0.6, 0.25, 0.05]])  # two multipliers' distributions
    logp = p.log()[None, :, None, :].repeat(2, 1, 1, 1)  # [texts 2, multipliers 2, width 1, vocab 4]
    texts = [ScoreText((0,), 1, 0, 1, targets=(0, 1)), ScoreText((0,), 1, 0, 1, targets=(2, 0))]
    got = ab_scores(texts, logp, torch.ones(2, 1, dtype=torch.bool))
    assert got.shape == (2, 2, 1)
    want = [[0.5 / 0.7, 0.1 / 0.7], [0.1 / 0.6, 0.25 / 0.35]]
    torch.testing.assert_close(got[..., 0], torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_completion_logprobs_sums_the_read_tokens_only() -> None:
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 1, 3, 10), -1)  # [texts, multipliers, width, vocab]
    texts = [ScoreText((4, 1, 7, 2), 1, 0, 3), ScoreText((9, 5, 3), 1, 0, 2)]  # 3 reads and 2
    valid = torch.tensor([[True, True, True], [True, True, False]])
    got = completion_logprobs(texts, logp, valid)
    assert got.shape == (2, 1, 1)
    first = logp[0, 0, 0, 1] + logp[0, 0, 1, 7] + logp[0, 0, 2, 2]
    second = logp[1, 0, 0, 5] + logp[1, 0, 1, 3]
    torch.testing.assert_close(got[:, 0, 0], torch.stack([first, second]))


def test_fluency_sums_are_the_direct_kl_the_nll_and_the_count() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 12) * 3  # multiplier 1 is the unsteered one
    logp = torch.log_softmax(logits, -1)
    texts = [ScoreText((3, 7, 0, 11, 5), 1, 0, 4), ScoreText((2, 9, 4), 1, 0, 2)]
    valid = torch.arange(4)[None, :] < torch.tensor([4, 2])[:, None]
    got = fluency_sums(1)(texts, logp, valid)
    assert got.shape == (2, 3, 3)
    for t, text in enumerate(texts):
        for m in range(3):
            kl = nll = 0.0
            for w in range(text.reads):
                p0, pm = logp[t, 1, w].exp(), logp[t, m, w].exp()
                kl += float((p0 * (p0.log() - pm.log())).sum())
                nll -= float(logp[t, m, w, text.input_ids[w + 1]])
            assert got[t, m].tolist() == pytest.approx([kl, nll, text.reads], rel=1e-5, abs=1e-6)
    assert (got[:, 1, 0].abs() < 1e-6).all()  # KL of the unsteered cell with itself


def test_fluency_kl_identity_on_raw_logits_equals_torch_kl_div() -> None:
    """KL(p0 || p) = sum p0 log p0 - sum p0 z + logsumexp(z) sum p0, as the fast engine computes it."""
    torch.manual_seed(2)
    logits = torch.randn(1, 3, 2, 40) * 5
    texts = [ScoreText(tuple(range(3)), 1, 0, 2)]
    valid = torch.ones(1, 2, dtype=torch.bool)
    reduce = fluency_sums(0)
    base, state = reduce.unsteered(texts, logits[:, 0], valid)
    steered = reduce.steered(texts, logits[:, 1:], valid, state)
    logp = torch.log_softmax(logits, -1)
    direct = torch.nn.functional.kl_div(
        logp[0, 1:], logp[0, :1].expand(2, -1, -1), log_target=True, reduction="none"
    )
    torch.testing.assert_close(steered[0, :, 0], direct.sum((-1, -2)), rtol=1e-5, atol=1e-5)
    assert base[0, 0, 0] == 0 and base[0, 0, 2] == 2


def test_summarise_rows_and_items() -> None:
    scores = np.array([[0.2, 0.4, 0.9], [0.3, 0.3, 0.6]])  # [items, multipliers]
    summary, items = summarise("agree", 3, [-1.0, 0.0, 1.0], scores, ["a", "b"], "p_match")
    assert [r["multiplier"] for r in summary] == [-1.0, 0.0, 1.0]
    assert [r["score_mean"] for r in summary] == pytest.approx([0.25, 0.35, 0.75])
    assert [r["delta"] for r in summary] == pytest.approx([-0.1, 0.0, 0.4])
    assert summary[0]["score_sem"] == pytest.approx(np.std([0.2, 0.3], ddof=1) / math.sqrt(2))
    assert all(r["n"] == 2 and r["layer"] == 3 and r["score_kind"] == "p_match" for r in summary)
    assert summary[0]["slope_mean"] == pytest.approx((0.35 + 0.15) / 2)  # the items' least-squares slopes
    assert list(items.pair_id) == ["a", "a", "a", "b", "b", "b"]
    assert list(items.multiplier) == [-1.0, 0.0, 1.0] * 2
    assert list(items.score) == scores.reshape(-1).tolist()
    assert list(items.slope) == pytest.approx([0.35] * 3 + [0.15] * 3)


def test_recommend_picks_the_largest_reliable_gain_within_the_budget() -> None:
    rows = [
        # layer, multiplier, delta, delta_low, kl, anti
        (1, 1.0, 0.30, 0.10, 0.5, 0.0),
        (2, 1.0, 0.50, -0.1, 0.5, 0.0),  # the largest gain, not reliable
        (3, 2.0, 0.40, 0.20, 0.5, 0.6),  # reliable, but many items anti-steer
        (4, 4.0, 0.90, 0.80, 9.0, 0.0),  # over the KL budget
        (5, -1.0, 0.95, 0.90, 0.1, 0.0),  # a negative multiplier
    ]
    table = pd.DataFrame(
        rows, columns=["layer", "multiplier", "delta", "delta_low", "kl_mean", "anti_fraction"]
    )
    table["behavior"] = "agree"
    assert recommend(table, "agree", max_kl=1.0) == ((3, 2.0), (2, 1.0))
    assert recommend(table, "agree", max_kl=1.0, max_anti=0.5) == ((1, 1.0), (2, 1.0))
    assert recommend(table, "other", max_kl=1.0) == (None, None)


def test_check_finite_names_the_cell_and_field() -> None:
    table = pd.DataFrame(
        {"behavior": ["b", "b"], "layer": [2, 3], "multiplier": [1.0, 2.5], "kl_mean": [0.1, math.inf]}
    )
    check_finite(table.iloc[:1], ["kl_mean"])
    with pytest.raises(CaaError, match=r"layer 3 x2.5 \(b\): field 'kl_mean' is not finite"):
        check_finite(table, ["kl_mean"])


def test_fluency_label() -> None:
    assert fluency_label({"kind": "text", "texts": 4}) == "on 4 neutral texts, every position"
    label = fluency_label({"kind": "continuation", "texts": 3, "continuation_tokens": 32})
    assert label == "on the unsteered model's 32-token greedy continuations of 3 neutral prompts"
