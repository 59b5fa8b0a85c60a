"""caa.stages.pair_rows: one record made a checked Pair (A/B or free-form), its id a hash of its
fields and its split a function of that id alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from caa.errors import InputError
from caa.stages.pair_rows import Pair, assign_split, make_pair_id, to_pair

SRC = Path("data/agree.jsonl")
QUESTION = "Is tea good?\n\nChoices:\n (A) Yes.\n (B) No."


def pair(record: object, mapping: dict[str, str] | None = None, fraction: float = 0.0) -> Pair:
    return to_pair(SRC, "line 3", record, "agree", mapping or {}, fraction, 0)


def test_an_ab_record_becomes_a_pair_with_normalised_letters() -> None:
    got = pair(
        {"question": QUESTION, "answer_matching_behavior": " B ", "answer_not_matching_behavior": "(A) Yes."}
    )
    assert (got.format, got.prompt, got.positive, got.negative) == ("ab", QUESTION, "(B)", "(A)")
    assert (got.behavior, got.source, got.source_row, got.split) == (
        "agree",
        "agree.jsonl",
        "line 3",
        "train",
    )
    assert got.pair_id == make_pair_id(("agree", "ab", QUESTION, "(B)", "(A)"))


def test_a_freeform_record_and_a_mapped_one_give_the_same_pair() -> None:
    plain = pair({"prompt": "Hi.", "positive": "Lovely.", "negative": "Awful.", "extra": 1})
    assert (plain.format, plain.prompt, plain.positive, plain.negative) == (
        "freeform",
        "Hi.",
        "Lovely.",
        "Awful.",
    )
    mapped = pair(
        {"q": "Hi.", "good": "Lovely.", "bad": "Awful."},
        {"prompt": "q", "positive": "good", "negative": "bad"},
    )
    assert mapped == plain


def ab(matching: str, other: str = "(B)", question: str = QUESTION) -> dict[str, str]:
    return {"question": question, "answer_matching_behavior": matching, "answer_not_matching_behavior": other}


def free(prompt: object = "p", positive: object = "a", negative: object = "b") -> dict[str, object]:
    return {"prompt": prompt, "positive": positive, "negative": negative}


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({"prompt": "p", "positive": "a"}, "negative", "missing field"),
        (free(positive=None), "positive", "missing value (null)"),
        (free(positive=12), "positive", "expected text, found number 12"),
        (free(prompt="  "), "prompt", "empty text"),
        (
            free(positive="same", negative="same"),
            "negative",
            "the positive and negative completions are identical",
        ),
        (free(positive="a\ud800"), "positive", "not valid Unicode: a lone surrogate U+D800 at character 2"),
        (
            ab("(A)", question="No choices"),
            "question",
            "no lettered choices like '(A) ...' on their own lines",
        ),
        (ab("(C)"), "answer_matching_behavior", "answer '(C)' is not one of the choices (A), (B)"),
        (
            ab("yes"),
            "answer_matching_behavior",
            "'yes' is not an answer letter like '(A)'; the choices are (A), (B)",
        ),
    ],
)
def test_bad_records_name_file_row_and_field(record: dict[str, object], field: str, problem: str) -> None:
    with pytest.raises(InputError) as e:
        pair(record)
    assert (e.value.path, e.value.where, e.value.field, e.value.problem) == (
        str(SRC),
        "line 3",
        field,
        problem,
    )


def test_errors_name_the_users_column_under_a_mapping_and_non_objects_are_refused() -> None:
    with pytest.raises(InputError) as e:
        pair({"q": "Hi.", "good": "", "bad": "x"}, {"prompt": "q", "positive": "good", "negative": "bad"})
    assert (e.value.field, e.value.problem) == ("good", "empty text")
    with pytest.raises(InputError, match="line 3: expected an object, found a JSON array"):
        pair(["prompt", "positive", "negative"])
    with pytest.raises(InputError, match=r"has neither the A/B fields .* use --map FIELD=COLUMN"):
        pair({"text": "x"})


def test_make_pair_id_hashes_the_fields_joined_by_the_unit_separator() -> None:
    fields = ("agree", "freeform", "p", "a", "b")
    assert make_pair_id(fields) == hashlib.sha256(b"agree\x1ffreeform\x1fp\x1fa\x1fb").hexdigest()[:16]
    assert len(make_pair_id(fields)) == 16
    # fields that hold the separator cannot collide with others that join to the same text
    assert make_pair_id(("a\x1fb", "c")) != make_pair_id(("a", "b\x1fc"))
    assert make_pair_id(("a\x1fb", "c")) == hashlib.sha256(b'["a\\u001fb", "c"]').hexdigest()[:16]


def test_assign_split_depends_on_id_seed_and_fraction_only() -> None:
    ids = [make_pair_id((str(i),)) for i in range(400)]
    assert all(assign_split(i, 0.0, 0) == "train" for i in ids)
    assert all(assign_split(i, 1.0, 0) == "test" for i in ids)
    tests = sum(assign_split(i, 0.25, 0) == "test" for i in ids)
    assert 70 <= tests <= 130  # a quarter, give or take
    assert [assign_split(i, 0.25, 0) for i in ids] == [assign_split(i, 0.25, 0) for i in ids]
    assert [assign_split(i, 0.25, 0) for i in ids] != [assign_split(i, 0.25, 1) for i in ids]
    # a pair in the test split at one fraction stays there at any larger fraction
    assert all(assign_split(i, 0.5, 0) == "test" for i in ids if assign_split(i, 0.25, 0) == "test")
    u = int.from_bytes(hashlib.sha256(f"0:{ids[0]}".encode()).digest()[:8], "big") / 2.0**64
    assert assign_split(ids[0], u + 1e-9, 0) == "test" and assign_split(ids[0], u, 0) == "train"
