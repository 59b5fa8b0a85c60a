"""`caa inspect`: an artifact's metadata and a summary of its contents, read without the heavy columns.

The summary is computed from the few columns it needs: an activations file (which can be gigabytes)
is validated from its Parquet footer and only its key columns are read, never the activation vectors.

One module a little over 350 lines: the six summaries, one per kind, follow one pattern, are read
side by side, and only :func:`inspect_artifact` calls them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from caa.errors import InputError
from caa.evaluation.text_scores import SCORES, score_table
from caa.store.artifacts import read_artifact, read_meta
from caa.store.files import SpecialFileError, file_sha256
from caa.store.schemas import ACTIVATIONS, KINDS

# What the status of an input file means, for people.
INPUT_STATUS = {
    "unchanged": "unchanged",
    "changed": "changed since this file was written",
    "missing": "not found",
    "unchecked": "not checked",
    "special": "not a regular file (a device, pipe or directory): not read",
    "unreadable": "cannot be read",
}


@dataclass(frozen=True)
class InputCheck:
    """One input file recorded in the metadata, and whether it still has the recorded SHA-256."""

    path: str
    sha256: str  # as recorded when the artifact was written
    status: str  # a key of INPUT_STATUS
    current_sha256: str | None = None  # set when the file exists and was hashed

    @property
    def message(self) -> str:
        return INPUT_STATUS[self.status]


@dataclass
class Inspection:
    """What `caa inspect` reports about one artifact.

    ``summary`` holds kind-specific facts (counts, layers, multipliers, ...) and ``breakdown`` one row
    per behavior (per multiplier for generations); both hold plain JSON values only.
    """

    path: Path
    kind: str
    meta: dict[str, Any]
    size_bytes: int
    rows: int
    row_groups: int
    summary: dict[str, Any] = field(default_factory=dict)
    breakdown: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[InputCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything, as JSON-ready values (NaN becomes None)."""
        return _plain(
            {
                "path": str(self.path),
                "kind": self.kind,
                "size_bytes": self.size_bytes,
                "rows": self.rows,
                "row_groups": self.row_groups,
                "meta": self.meta,
                "summary": self.summary,
                "breakdown": self.breakdown,
                "inputs": [asdict(i) for i in self.inputs],
            }
        )


def inspect_artifact(path: Path | str, check_inputs: bool = True) -> Inspection:
    """Read an artifact's metadata, validate it as the kind it declares, and summarise its contents.

    A file that is missing, not Parquet, truncated, not a caa artifact, of another schema version or
    with a wrong column raises the usual `InputError` naming the file. With ``check_inputs`` every
    input recorded in the metadata is hashed again (relative paths from the current directory).
    """
    path = Path(path)
    meta = read_meta(path)
    name = meta.get("kind")
    if name not in KINDS:
        raise InputError(path, f"unknown artifact kind {name!r}; caa writes {', '.join(KINDS)}", field="kind")
    kind = KINDS[name]
    file_meta = pq.read_metadata(path)
    schema = file_meta.schema.to_arrow_schema()
    keys = ["pair_id", "behavior", "split", "side", "layer"] if kind is ACTIVATIONS else None
    table = read_artifact(path, kind, columns=keys).table  # never the activation vectors
    summary, breakdown = _SUMMARIES[kind.name](table, schema, meta)
    return Inspection(
        path=path,
        kind=kind.name,
        meta=meta,
        size_bytes=path.stat().st_size,
        rows=file_meta.num_rows,
        row_groups=file_meta.num_row_groups,
        summary=summary,
        breakdown=breakdown,
        inputs=check_input_files(meta.get("inputs") or {}, check_inputs),
    )


def check_input_files(recorded: Mapping[str, str], check: bool = True) -> list[InputCheck]:
    """Compare each recorded input's SHA-256 with the file on disk now.

    The paths come from the artifact, which anyone can write: only regular files are read (a
    device, a pipe or a /proc file could block or never end), and never past the size they had
    when opened."""
    checks = []
    for name, digest in recorded.items():
        if not check:
            checks.append(InputCheck(name, digest, "unchecked"))
            continue
        status, now = _hash_regular_file(Path(name))
        if status is None:
            status = "unchanged" if now == digest else "changed"
        checks.append(InputCheck(name, digest, status, now))
    return checks


def _hash_regular_file(path: Path) -> tuple[str | None, str | None]:
    """(None, SHA-256) of a regular file, or (the status that says why not, None)."""
    try:
        return None, file_sha256(path)
    except FileNotFoundError:
        return "missing", None
    except SpecialFileError:
        return "special", None
    except OSError:
        return ("special" if path.exists() and not path.is_file() else "unreadable"), None


def layer_spans(layers: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8``: the syntax of ``--layers``."""
    spans = []
    for _, run in groupby(enumerate(sorted(set(layers))), key=lambda iv: iv[1] - iv[0]):
        values = [v for _, v in run]
        spans.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(spans)


def _d_model(schema: pa.Schema, column: str) -> int:
    return int(schema.field(column).type.list_size)


def _frame(table: pa.Table, columns: list[str]) -> pd.DataFrame:
    frame = table.select(columns).to_pandas()
    if "split" in frame:
        frame["split"] = frame["split"].astype(str)
    return frame


def _sorted(values: pd.Series) -> list[Any]:
    """The distinct values, sorted, as plain Python values (found vectorised, not row by row)."""
    return sorted(_plain(v) for v in pd.unique(values))


def _split_counts(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Rows per ``by`` x split, with train and test columns (0 where absent)."""
    counts = frame.groupby([*by, "split"]).size().unstack("split", fill_value=0)
    return counts.reindex(columns=["train", "test"], fill_value=0).reset_index()


Summary = tuple[dict[str, Any], list[dict[str, Any]]]


def _pairs(table: pa.Table, schema: pa.Schema, meta: Mapping[str, Any]) -> Summary:
    frame = _frame(table, ["behavior", "format", "split"])
    per = _split_counts(frame, ["behavior", "format"])
    per["pairs"] = per.train + per.test
    summary = {
        "pairs": len(frame),
        "behaviors": _sorted(frame.behavior),
        "formats": {str(k): int(v) for k, v in frame.format.value_counts().sort_index().items()},
        "train": int(per.train.sum()),
        "test": int(per.test.sum()),
    }
    return summary, _records(per[["behavior", "format", "pairs", "train", "test"]])


def _activations(table: pa.Table, schema: pa.Schema, meta: Mapping[str, Any]) -> Summary:
    frame = _frame(table, ["pair_id", "behavior", "split", "side", "layer"])
    pairs = frame.drop_duplicates("pair_id")
    per = _split_counts(pairs, ["behavior"])
    per["pairs"] = per.train + per.test
    layers = frame.groupby("behavior").layer.agg(lambda s: _sorted(s)).rename("layers")
    per = per.merge(layers, left_on="behavior", right_index=True)
    summary = {
        "behaviors": _sorted(frame.behavior),
        "layers": _sorted(frame.layer),
        "d_model": _d_model(schema, "activation"),
        "pairs": len(pairs),
        "texts": len(frame.drop_duplicates(["pair_id", "side"])),
        "sides": _sorted(frame.side),
        "train": int(per.train.sum()),
        "test": int(per.test.sum()),
    }
    return summary, _records(per[["behavior", "pairs", "train", "test", "layers"]])


def _vectors(table: pa.Table, schema: pa.Schema, meta: Mapping[str, Any]) -> Summary:
    columns = ["behavior", "layer", "method", "n_train", "n_test", "vector_norm", "test_auc"]
    frame = _frame(table, [*columns, "norm_ratio"])
    per = (
        frame.groupby("behavior")
        .agg(
            layers=("layer", lambda s: _sorted(s)),
            n_train=("n_train", "max"),
            n_test=("n_test", "max"),
            norm_min=("vector_norm", "min"),
            norm_max=("vector_norm", "max"),
            best_auc=("test_auc", "max"),
            max_norm_ratio=("norm_ratio", "max"),
        )
        .reset_index()
    )
    scored = frame.dropna(subset=["test_auc"])
    best = scored.loc[scored.groupby("behavior").test_auc.idxmax(), ["behavior", "layer"]]
    per = per.merge(best.rename(columns={"layer": "best_auc_layer"}), on="behavior", how="left")
    per["best_auc_layer"] = per.best_auc_layer.astype("Int64")
    per["vector_norm_range"] = list(zip(per.pop("norm_min"), per.pop("norm_max"), strict=True))
    auc = frame.test_auc.dropna()
    summary = {
        "behaviors": _sorted(frame.behavior),
        "layers": _sorted(frame.layer),
        "vectors": len(frame),
        "method": _sorted(frame.method),
        "d_model": _d_model(schema, "vector"),
        "vector_norm_range": [float(frame.vector_norm.min()), float(frame.vector_norm.max())]
        if len(frame)
        else None,
        "test_auc_range": [float(auc.min()), float(auc.max())] if len(auc) else None,
    }
    columns = [
        "behavior", "layers", "n_train", "n_test", "vector_norm_range", "max_norm_ratio", "best_auc",
        "best_auc_layer",
    ]  # fmt: skip
    return summary, _records(per[columns])


def _sweep(table: pa.Table, schema: pa.Schema, meta: Mapping[str, Any]) -> Summary:
    columns = ["behavior", "layer", "multiplier", "score_kind", "n", "delta", "kl_mean", "delta_low"]
    every = _frame(table, [*columns, "anti_fraction", "system"])
    frame = every[every.system == "none"]  # the prompting arms' rows are summarised in the metadata
    per = (
        frame.groupby("behavior")
        .agg(
            score_kind=("score_kind", "first"),
            n=("n", "max"),
            layers=("layer", lambda s: _sorted(s)),
            best_delta=("delta", "max"),
        )
        .reset_index()
    )
    recommended = dict(meta.get("recommended") or {})
    shown = ["delta", "delta_low", "kl_mean", "anti_fraction"]
    cells = {
        (r.behavior, int(r.layer), float(r.multiplier)): {k: _plain(getattr(r, k)) for k in shown}
        for r in frame.itertuples()
    }
    # the recommended cell per behavior, looked up in Python: the metadata's numbers may not fit
    # the table's column types
    at = {
        b: {"layer": r[0], "multiplier": r[1], **cells.get((b, r[0], r[1]), dict.fromkeys(shown))}
        for b, r in recommended.items()
        if r
    }
    per["recommended"] = [at.get(b) for b in per.behavior]
    summary = {
        "behaviors": _sorted(frame.behavior),
        "layers": _sorted(frame.layer),
        "multipliers": _sorted(frame.multiplier),
        "score_kinds": _sorted(frame.score_kind),
        "cells": len(frame),
        "recommended": {
            b: {"layer": r[0], "multiplier": r[1]} if r else None for b, r in recommended.items()
        },
        "max_kl": (meta.get("options") or {}).get("max_kl"),
        "steer_positions": (meta.get("options") or {}).get("steer_positions"),
        "fluency": (meta.get("fluency") or {}).get("kind"),
        "system_prompts": _sorted(every.system),
    }
    return summary, _records(per)


def _sweep_items(table: pa.Table, schema: pa.Schema, meta: Mapping[str, Any]) -> Summary:
    frame = _frame(table, ["behavior", "layer", "multiplier", "pair_id", "slope"])
    items = frame.drop_duplicates(["behavior", "layer", "pair_id"])
    per = (
        items.groupby(["behavior", "layer"])
        .agg(
            items=("pair_id", "size"),
            mean_slope=("slope", "mean"),
            anti_steerable=("slope", lambda s: float((s < 0).mean()) if s.notna().all() else None),
        )
        .reset_index()
    )
    summary = {
        "behaviors": _sorted(frame.behavior),
        "layers": _sorted(frame.layer),
        "multipliers": _sorted(frame.multiplier),
        "items": int(frame.pair_id.nunique()),
        "rows": len(frame),
    }
    return summary, _records(per)


def _side_effects(table: pa.Table, schema: pa.Schema, meta: Mapping[str, Any]) -> Summary:
    columns = ["behavior", "layer", "multiplier", "cell", "target", "n", "delta", "delta_low", "delta_high"]
    frame = _frame(table, columns)
    summary = {
        "behaviors": _sorted(frame.behavior),
        "targets": _sorted(frame.target),
        "rows": len(frame),
        "excluding_zero": int(((frame.delta_low > 0) | (frame.delta_high < 0)).sum()),
    }
    return summary, _records(frame)


def _generations(table: pa.Table, schema: pa.Schema, meta: Mapping[str, Any]) -> Summary:
    frame = _frame(table, ["prompt_index", "behavior", "layer", "multiplier", "n_tokens", *SCORES])
    per = (
        frame.groupby("multiplier")
        .agg(completions=("n_tokens", "size"), mean_tokens=("n_tokens", "mean"))
        .reset_index()
        .merge(score_table(frame), on="multiplier")  # the probe and judge means, where scored
    )
    summary = {
        "prompts": int(frame.prompt_index.nunique()),
        "multipliers": _sorted(frame.multiplier),
        "completions": len(frame),
        "layers": _sorted(frame.layer),
        "behaviors": _sorted(frame.behavior),
        "mean_tokens": float(frame.n_tokens.mean()) if len(frame) else None,
    }
    return summary, _records(per)


_SUMMARIES: dict[str, Callable[[pa.Table, pa.Schema, Mapping[str, Any]], Summary]] = {
    "pairs": _pairs,
    "activations": _activations,
    "vectors": _vectors,
    "sweep": _sweep,
    "sweep_items": _sweep_items,
    "sweep_side_effects": _side_effects,
    "generations": _generations,
}


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [_plain(r) for r in frame.to_dict(orient="records")]


def _plain(value: Any) -> Any:
    """NumPy scalars to Python ones, NaN to None, recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value
