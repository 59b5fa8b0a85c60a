"""caa.store.schemas: every artifact kind declared once, its schema completed with d_model."""

from __future__ import annotations

import pyarrow as pa
import pytest

from caa.store import schemas
from caa.store.schemas import ACTIVATIONS, KINDS, META_FIELDS_OF_KIND, PAIRS, SWEEP, VECTORS


def test_kinds_are_the_seven_parquet_artifacts_by_name() -> None:
    assert list(KINDS) == [
        "pairs",
        "activations",
        "vectors",
        "sweep",
        "sweep_items",
        "sweep_side_effects",
        "generations",
    ]
    assert all(KINDS[name].name == name for name in KINDS)
    assert all(k.command.startswith("caa ") for k in KINDS.values())
    assert set(META_FIELDS_OF_KIND) <= set(KINDS)


def test_schema_appends_the_fixed_size_vector_column() -> None:
    schema = VECTORS.schema(7)
    assert schema.names[-1] == "vector"
    assert schema.field("vector").type == pa.list_(pa.float32(), 7)
    assert not schema.field("vector").nullable
    assert schema.names[:-1] == [f.name for f in VECTORS.fields]
    assert ACTIVATIONS.schema(3).field("activation").type.list_size == 3


def test_schema_of_a_vector_kind_needs_d_model() -> None:
    with pytest.raises(ValueError, match="the vectors schema needs d_model"):
        VECTORS.schema()


def test_schema_without_vector_ignores_d_model_and_keeps_nullability() -> None:
    assert PAIRS.schema() == PAIRS.schema(5)
    assert PAIRS.schema().names == [
        "pair_id",
        "behavior",
        "format",
        "prompt",
        "positive",
        "negative",
        "split",
        "source",
        "source_row",
    ]
    assert PAIRS.schema().field("split").type == pa.dictionary(pa.int8(), pa.string())
    assert not any(f.nullable for f in PAIRS.fields)
    sweep = SWEEP.schema()
    assert sweep.field("score_sem").nullable and not sweep.field("score_mean").nullable
    assert sweep.field("backward_items").type == pa.list_(pa.string())


def test_non_parquet_outputs_are_declared_with_their_marks() -> None:
    assert schemas.PLOT.command == "caa sweep" and schemas.PLOT.fields == ()
    assert schemas.EXPORT.command == "caa export"
    assert schemas.REPORT.command == "caa report"
    assert isinstance(schemas.EXPORT_MARKER, bytes)
    assert schemas.PNG_SOFTWARE == "caa sweep"
    assert schemas.REPORT_GENERATOR == "caa report"
    assert "plot" not in KINDS and "report" not in KINDS


def test_a_kind_reads_its_older_versions_and_knows_what_they_lack() -> None:
    """The sweep's version 2 added the arm (column system): version 1 files read as arm none; kinds
    that never changed read version 1 only."""
    from caa.store.schemas import PAIRS, SWEEP, SWEEP_ITEMS, SYSTEM_ARMS

    assert SWEEP.version == SWEEP_ITEMS.version == 2 and PAIRS.version == 1
    assert [SWEEP.reads(v) for v in (0, 1, 2, 3, True, "2")] == [False, True, True, False, False, False]
    assert [PAIRS.reads(v) for v in (1, 2)] == [True, False]
    assert (
        SWEEP.missing_in(1) == SWEEP_ITEMS.missing_in(1) == {"system": "none"} and SWEEP.missing_in(2) == {}
    )
    assert SYSTEM_ARMS == ("none", "positive", "negative") and SWEEP.schema().field("kl_mean").nullable
