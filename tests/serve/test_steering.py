"""The engine-free half of serving: what a request's keys mean, and the per-token tables (no vLLM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from caa.core.hooks import steer_start
from caa.errors import MismatchError
from caa.models.loading import directory_hash
from caa.serve.plugin import check_model, request_keys
from caa.serve.steering import SteeringRequestError, Tables, VectorBank, flat_keys
from caa.stages.vectors import VectorSet


@pytest.fixture
def bank() -> VectorBank:
    frame = pd.DataFrame({"behavior": ["mood", "mood", "agree", "café"], "layer": [1, 3, 2, 0]})
    values = np.arange(4 * 6, dtype=np.float32).reshape(4, 6) + 1
    return VectorBank(VectorSet(frame, values, {}))


def test_a_request_without_caa_keys_is_unsteered(bank: VectorBank) -> None:
    assert bank.parse(None) is None
    assert bank.parse({}) is None
    assert bank.parse({"other_plugin": 1}) is None


def test_a_request_names_behavior_layer_multiplier_and_positions(bank: VectorBank) -> None:
    steer = bank.parse({"caa_behavior": "mood", "caa_layer": 3, "caa_multiplier": -2})
    assert steer is not None
    assert (steer.behavior, steer.layer, steer.multiplier, steer.positions, steer.row) == (
        "mood",
        3,
        -2.0,
        "answer",
        1,
    )
    only = bank.parse({"caa_behavior": "agree", "caa_multiplier": 1.5, "caa_positions": "all"})
    assert only is not None and (only.layer, only.row, only.positions) == (2, 2, "all")
    decomposed = "cafe\u0301"  # the same name, not in NFC
    assert bank.parse({"caa_behavior": decomposed, "caa_multiplier": 1.0}).row == 3  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("keys", "field", "words"),
    [
        ({"caa_layer": 1, "caa_multiplier": 1.0}, "caa_behavior", "required"),
        ({"caa_behavior": 3, "caa_multiplier": 1.0}, "caa_behavior", "required"),
        ({"caa_behavior": "nope", "caa_multiplier": 1.0}, "caa_behavior", "loaded: agree, café, mood"),
        ({"caa_behavior": "mood", "caa_multiplier": 1.0}, "caa_layer", "has layers 1, 3"),
        ({"caa_behavior": "mood", "caa_layer": 2, "caa_multiplier": 1.0}, "caa_layer", "it has 1, 3"),
        ({"caa_behavior": "mood", "caa_layer": "1", "caa_multiplier": 1.0}, "caa_layer", "not an integer"),
        ({"caa_behavior": "mood", "caa_layer": True, "caa_multiplier": 1.0}, "caa_layer", "not an integer"),
        ({"caa_behavior": "mood", "caa_layer": 1}, "caa_multiplier", "required"),
        ({"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": "2"}, "caa_multiplier", "not a number"),
        (
            {"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": float("nan")},
            "caa_multiplier",
            "not finite",
        ),
        (
            {"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": float("-inf")},
            "caa_multiplier",
            "not finite",
        ),
        (
            {"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": 1.0, "caa_positions": "x"},
            "caa_positions",
            "use one",
        ),
        (
            {"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": 1.0, "caa_strength": 2},
            "caa_strength",
            "unknown",
        ),
    ],
)
def test_a_wrong_key_is_an_error_naming_it(bank: VectorBank, keys: dict, field: str, words: str) -> None:
    with pytest.raises(SteeringRequestError) as e:
        bank.parse(keys)
    assert e.value.field == f"vllm_xargs.{field}"
    assert str(e.value).startswith(f"vllm_xargs.{field}: ") and words in str(e.value)


def test_a_multiplier_that_overflows_the_models_dtype_is_refused(bank: VectorBank) -> None:
    keys = {"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": 1e4}
    assert bank.parse(keys, torch.float32) is not None
    with pytest.raises(SteeringRequestError, match=r"overflows torch\.float16"):
        bank.parse(keys, torch.float16)


def test_the_cache_salt_names_the_whole_steering(bank: VectorBank) -> None:
    base = {"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": 1.0}
    salts = {
        bank.parse(k).salt()  # type: ignore[union-attr]
        for k in (
            base,
            {**base, "caa_multiplier": 1.0 + 1e-12},
            {**base, "caa_layer": 3},
            {**base, "caa_positions": "all"},
            {**base, "caa_behavior": "agree", "caa_layer": 2},
        )
    }
    assert len(salts) == 5


def test_tables_steer_each_token_by_its_requests_rule(bank: VectorBank) -> None:
    """Three requests in one batch: a prompt chunk (positions 4..7 of a 6-token prompt, prompt-end),
    an unsteered decode token, and a decode token of an answer-steered request; padding after."""
    tables = Tables(bank, max_tokens=16, dtype=torch.float32, device="cpu")
    assert tables.layers == [0, 1, 2, 3]
    steers = [
        bank.parse(
            {"caa_behavior": "mood", "caa_layer": 3, "caa_multiplier": 2.0, "caa_positions": "prompt-end"}
        ),
        None,
        bank.parse({"caa_behavior": "agree", "caa_multiplier": -0.5}),
    ]
    positions = torch.tensor([4, 5, 6, 7, 9, 12, 0, 0])  # 2 padding tokens
    # an earlier, longer batch steered every token at one layer or another: all of it is cleared
    everywhere = [
        bank.parse({"caa_behavior": b, "caa_layer": layer, "caa_multiplier": 7.0, "caa_positions": "all"})
        for b, layer in (("mood", 1), ("mood", 3), ("agree", 2), ("café", 0))
    ]
    tables.fill(everywhere, [4] * 4, [0, 4, 8, 12, 16], torch.arange(16) % 4)
    assert tables.steered_tokens == 16 and int((tables.scale != 0).sum()) == 16
    tables.fill(steers, [6, 3, 12], [0, 4, 5, 6], positions)
    want = torch.zeros(4, 16)
    want[3, [1, 2, 3]] = 2.0  # prompt-end: positions >= 5
    want[2, 5] = -0.5  # answer: position 12 >= prompt length 12
    assert torch.equal(tables.scale, want)
    assert tables.rows[[1, 2, 3]].tolist() == [1, 1, 1] and int(tables.rows[5]) == 2
    assert tables.steered_tokens == 4
    # what a steered block adds is exactly caa's steering of that token: multiplier * vector
    residual = torch.zeros(8, 6)
    for layer, slot in tables.slot.items():
        added = residual + tables.scale[slot, :8, None] * tables.bank[tables.rows[:8]]
        for token, (r, at) in enumerate(
            [(0, 4), (0, 5), (0, 6), (0, 7), (1, 9), (2, 12), (None, 0), (None, 0)]
        ):
            steer = steers[r] if r is not None else None
            first = None if steer is None else steer_start(steer.positions, [6, 3, 12][r])  # type: ignore[index]
            on = steer is not None and steer.layer == layer and (first is None or at >= int(first[0]))
            expect = steer.multiplier * torch.from_numpy(bank.values[steer.row]) if on else torch.zeros(6)  # type: ignore[union-attr]
            assert torch.equal(added[token], expect), (layer, token)


def test_tables_of_an_unsteered_batch_are_zero_and_a_batch_too_large_is_an_error(bank: VectorBank) -> None:
    tables = Tables(bank, max_tokens=4, dtype=torch.float32, device="cpu")
    steer = bank.parse({"caa_behavior": "agree", "caa_multiplier": 1.0, "caa_positions": "all"})
    tables.fill([steer], [4], [0, 4], torch.arange(4))
    assert tables.scale[2].tolist() == [1.0] * 4 and tables.steered_tokens == 4
    tables.fill([None, None], [3, 3], [0, 3, 6], torch.arange(6))
    assert not tables.scale.any() and tables.steered_tokens == 0
    with pytest.raises(Exception, match="hold 4 tokens; the batch has 6"):
        tables.fill([steer, None], [3, 3], [0, 3, 6], torch.arange(6))
    tables.fill([steer], [3], [0, 3], torch.arange(3))
    assert tables.scale[2, :3].tolist() == [1.0, 1.0, 1.0]


def test_the_plugin_refuses_vectors_of_another_model(tmp_path: Path) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    for directory, weights in ((mine, b"mine"), (other, b"other")):
        directory.mkdir()
        (directory / "config.json").write_text("{}")
        (directory / "model.safetensors").write_bytes(weights)
    frame = pd.DataFrame({"behavior": ["mood", "mood"], "layer": [0, 3]})
    made = {"model": {"weights_hash": directory_hash(mine), "hidden_size": 6}}
    bank = VectorBank(VectorSet(frame, np.ones((2, 6), np.float32), made, Path("v.parquet")))
    check_model(bank, str(mine), 6, 4)
    check_model(bank, "org/a-hub-id", 6, 4)  # no directory to hash: width and layers only
    with pytest.raises(
        MismatchError, match=r"^v\.parquet: field 'model\.weights_hash' is 'dir:.*another model"
    ):
        check_model(bank, str(other), 6, 4)
    with pytest.raises(MismatchError, match=r"field 'vector' has width 6 but the model's hidden_size is 8"):
        check_model(bank, str(mine), 8, 4)
    with pytest.raises(
        MismatchError, match=r"field 'layer': layer 3 is out of range; the model has 3 blocks"
    ):
        check_model(bank, str(mine), 6, 3)


def test_a_nested_steering_object_is_the_flat_keys_and_its_errors_name_its_fields(bank: VectorBank) -> None:
    flat = flat_keys({"behavior": "mood", "layer": 3, "multiplier": -2, "positions": "all", "scale": "raw"})
    assert flat == {
        "caa_behavior": "mood",
        "caa_layer": 3,
        "caa_multiplier": -2,
        "caa_positions": "all",
        "caa_scale": "raw",
    }
    assert bank.parse(flat) == bank.parse({k: v for k, v in flat.items() if k != "caa_scale"})
    with pytest.raises(SteeringRequestError) as e:
        flat_keys({"behavior": "mood", "strength": 2})
    assert (e.value.field, e.value.status) == ("steering.strength", 400)
    with pytest.raises(SteeringRequestError, match=r"^steering: an object"):
        flat_keys(["mood", 3])
    with pytest.raises(SteeringRequestError) as e:
        bank.parse({"caa_behavior": "mood", "caa_layer": 7, "caa_multiplier": 1.0}, field="steering.")
    assert e.value.field == "steering.layer" and str(e.value).startswith("steering.layer: no vector")


def test_request_keys_take_nested_or_flat_steering_never_both() -> None:
    assert request_keys({"other": 1}, None) == ({"other": 1}, "vllm_xargs.caa_")
    keys, field = request_keys({"other": 1}, {"behavior": "mood", "multiplier": 1.0})
    assert keys == {"other": 1, "caa_behavior": "mood", "caa_multiplier": 1.0} and field == "steering."
    with pytest.raises(SteeringRequestError, match="either nested or as vllm_xargs"):
        request_keys({"caa_behavior": "mood"}, {"behavior": "mood", "multiplier": 1.0})


def test_residual_scale_multiplies_the_direction_at_the_layers_mean_residual_norm() -> None:
    frame = pd.DataFrame({"behavior": ["mood", "mood"], "layer": [1, 2], "mean_residual_norm": [10.0, None]})
    values = np.array([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
    vectors = VectorSet(frame, values, {})
    bank = VectorBank(vectors)
    steer = bank.parse(
        {"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": 0.5, "caa_scale": "residual"}
    )
    assert steer is not None and steer.scale == "residual"
    # what caa generate --scale residual adds: multiplier * VectorSet.vector(..., "residual")
    want = 0.5 * vectors.vector("mood", 1, "residual")
    assert np.allclose(steer.coefficient * values[0], want) and np.allclose(want, [3.0, 4.0, 0.0])
    raw = bank.parse({"caa_behavior": "mood", "caa_layer": 1, "caa_multiplier": 0.5})
    assert raw is not None and raw.coefficient == 0.5 and raw.salt() != steer.salt()
    with pytest.raises(SteeringRequestError, match="no mean residual norm: use raw"):
        bank.parse({"caa_behavior": "mood", "caa_layer": 2, "caa_multiplier": 1.0, "caa_scale": "residual"})
    with pytest.raises(SteeringRequestError, match="'unit': use one of raw, residual"):
        bank.parse({"caa_behavior": "mood", "caa_layer": 2, "caa_multiplier": 1.0, "caa_scale": "unit"})


def test_vectors_added_while_serving_get_the_next_rows_in_bank_and_tables(bank: VectorBank) -> None:
    bank = VectorBank(VectorSet(bank_frame(), np.ones((4, 6), np.float32), {}), capacity=6)
    tables = Tables(bank, max_tokens=8, dtype=torch.float32, device="cpu", layers=[5])
    assert tables.layers == [0, 1, 2, 3, 5] and tables.bank.shape == (6, 6) and not tables.bank[4:].any()
    body = {"vectors": [{"behavior": "new", "layer": 5, "vector": [0.5] * 6, "mean_residual_norm": 3}]}
    new = bank.check_new(body, [0, 1, 2, 3, 5])
    rows = bank.add(new)
    tables.put(rows, np.stack([v.values for v in new]))
    assert rows == [4] and tables.bank[4].tolist() == [0.5] * 6
    steer = bank.parse({"caa_behavior": "new", "caa_multiplier": 2.0, "caa_scale": "residual"})
    assert steer is not None and (steer.row, steer.layer) == (4, 5)
    assert steer.coefficient == pytest.approx(2.0 * 3 / np.linalg.norm([0.5] * 6))
    assert bank.listing()[4] == {
        "behavior": "new",
        "layer": 5,
        "norm": pytest.approx(np.linalg.norm([0.5] * 6)),
        "mean_residual_norm": 3.0,
        "source": "posted",
    }
    single = bank.check_new({"behavior": "other", "layer": 0, "vector": [1] * 6}, [0, 5])
    assert [(v.behavior, v.layer) for v in single] == [("other", 0)]


def bank_frame() -> pd.DataFrame:
    return pd.DataFrame({"behavior": ["mood", "mood", "agree", "café"], "layer": [1, 3, 2, 0]})


@pytest.mark.parametrize(
    ("body", "field", "status", "words"),
    [
        ({"vectors": []}, "vectors", 400, "non-empty list"),
        ({"vectors": [3]}, "vectors[0]", 400, "an object"),
        (
            {"behavior": "x", "layer": 1, "vector": [1.0] * 5},
            "vector",
            400,
            "has 5 numbers; the model's width is 6",
        ),
        ({"behavior": "x", "layer": 1, "vector": [1.0] * 5 + [float("nan")]}, "vector", 400, "not finite"),
        ({"behavior": "x", "layer": 1, "vector": [1.0] * 5 + [1e39]}, "vector", 400, "not finite in float32"),
        ({"behavior": "x", "layer": 1, "vector": [1.0] * 5 + ["1"]}, "vector", 400, "a list of numbers"),
        ({"behavior": "x", "layer": 4, "vector": [1.0] * 6}, "layer", 400, "not steerable on this server"),
        ({"behavior": "x", "layer": "1", "vector": [1.0] * 6}, "layer", 400, "not an integer"),
        ({"behavior": "\u200b", "layer": 1, "vector": [1.0] * 6}, "behavior", 400, "visible behavior name"),
        ({"behavior": "x", "layer": 1, "vector": [1.0] * 6, "norm": 2}, "norm", 400, "unknown key"),
        (
            {"behavior": "x", "layer": 1, "vector": [1.0] * 6, "mean_residual_norm": -1},
            "mean_residual_norm",
            400,
            "not a positive number",
        ),
        ({"behavior": "mood", "layer": 1, "vector": [1.0] * 6}, "behavior", 409, "loaded already"),
        (
            {"vectors": [{"behavior": "x", "layer": 1, "vector": [1.0] * 6}] * 2},
            "vectors[1].behavior",
            409,
            "loaded already",
        ),
        (
            {"vectors": [{"behavior": f"x{i}", "layer": 1, "vector": [1.0] * 6} for i in range(3)]},
            "vectors",
            413,
            "holds at most 6",
        ),
    ],
)
def test_a_posted_vector_is_checked_and_its_error_names_the_field(
    body: dict, field: str, status: int, words: str
) -> None:
    bank = VectorBank(VectorSet(bank_frame(), np.ones((4, 6), np.float32), {}), capacity=6)
    with pytest.raises(SteeringRequestError) as e:
        bank.check_new(body, [0, 1, 2, 3])
    assert (e.value.field, e.value.status) == (field, status) and words in str(e.value)
    assert len(bank.keys) == 4


@pytest.mark.parametrize("positions", ["answer", "prompt-end", "all"])
def test_a_requests_first_steered_position_is_steer_starts(bank: VectorBank, positions: str) -> None:
    steer = bank.parse({"caa_behavior": "agree", "caa_multiplier": 1.0, "caa_positions": positions})
    assert steer is not None
    for length in (1, 2, 7, 300):
        first = steer_start(positions, length)
        assert steer.start(length) == (0 if first is None else int(first[0]))


def test_tables_match_a_token_by_token_reading_over_many_batches(bank: VectorBank) -> None:
    """Random batches in a row (prompt chunks and decode tokens, unsteered rows, multiplier 0,
    padding), each against the rule read token by token; stale values never survive a batch."""
    rng = np.random.default_rng(0)
    tables = Tables(bank, max_tokens=64, dtype=torch.float32, device="cpu")
    choices = [None, *[(b, layer) for b, layer in bank.keys]]
    for _ in range(40):
        n = int(rng.integers(1, 7))
        steers, lengths, counts, firsts = [], [], [], []
        for _ in range(n):
            pick = choices[int(rng.integers(len(choices)))]
            multiplier = float(rng.choice([0.0, -1.5, 2.0]))
            policy = str(rng.choice(["answer", "prompt-end", "all"]))
            keys = (
                None
                if pick is None
                else {"caa_behavior": pick[0], "caa_layer": pick[1], "caa_multiplier": multiplier}
            )
            steers.append(bank.parse({**keys, "caa_positions": policy} if keys else None))
            lengths.append(int(rng.integers(1, 12)))
            counts.append(int(rng.integers(1, 6)))  # a chunk of the prompt, or a decode token
            firsts.append(int(rng.integers(0, 16)))  # the chunk's first absolute position
        query_start = [0, *np.cumsum(counts).tolist()]
        pad = int(rng.integers(0, 4))
        positions = torch.tensor(
            [f + k for f, c in zip(firsts, counts, strict=True) for k in range(c)] + [0] * pad
        )
        tables.fill(steers, lengths, query_start, positions)
        want_scale, want_rows = torch.zeros(4, 64), {}
        for r, steer in enumerate(steers):
            for token in range(query_start[r], query_start[r + 1]):
                if steer is None or steer.multiplier == 0.0:
                    continue
                first = steer_start(steer.positions, lengths[r])
                if first is None or int(positions[token]) >= int(first[0]):
                    want_scale[tables.slot[steer.layer], token] = steer.multiplier
                    want_rows[token] = steer.row
        assert torch.equal(tables.scale, want_scale)
        assert {t: int(tables.rows[t]) for t in want_rows} == want_rows
        assert tables.steered_tokens == len(want_rows)
