"""Prompt formats and fitting texts to the context (caa.prompts)."""

from __future__ import annotations

import pytest

from caa.errors import CaaError


def test_fit_context_cuts_the_prompt_start_only() -> None:
    from caa.prompts import Encoded, fit_context

    enc = Encoded(list(range(10)), 7, [8, 9])
    assert fit_context(enc, 10, False, "x") == (enc, False)
    assert fit_context(enc, 6, True, "x") == (Encoded([4, 5, 6, 7, 8, 9], 3, [4, 5]), True)
    with pytest.raises(CaaError, match="x is 10 tokens, longer than the model's context of 6"):
        fit_context(enc, 6, False, "x")
    with pytest.raises(CaaError, match="x: its completion alone is 3 tokens"):
        fit_context(enc, 3, True, "x")
