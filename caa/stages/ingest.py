"""`caa ingest`: contrastive pairs from A/B JSON, JSONL, CSV or Parquet into one validated table.

The rows of each format are read and checked in :mod:`caa.stages.pair_rows`; here they are gathered (a
caa pairs file keeps its pairs as they are, duplicates are dropped), kept as a :class:`PairSet`,
selected by split and behavior, and written and read back as ``pairs.parquet``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from caa.errors import CaaError, InputError
from caa.stages.options import check_behavior
from caa.stages.pair_rows import AB_FIELDS, FREEFORM_FIELDS, Pair, records, to_pair
from caa.store.artifacts import make_meta, read_artifact, write_artifact
from caa.store.schemas import META_KEY, PAIRS
from caa.store.text import NAME_PROBLEM, behavior_name, check_name, same_name

SPLITS = ("train", "test")
FORMATS = ("ab", "freeform")
SIDES = ("positive", "negative")


@dataclass
class IngestResult:
    """The pairs kept, the rows rejected (with ``skip_invalid``) and the duplicates dropped."""

    pairs: list[Pair] = field(default_factory=list)
    rejected: list[InputError] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Pairs per behavior and split."""
        out: dict[str, dict[str, int]] = {}
        for p in self.pairs:
            per = out.setdefault(p.behavior, {"train": 0, "test": 0})
            per[p.split] += 1
        return out


@dataclass
class PairSet:
    """Contrastive pairs in memory: one row per pair (the PAIRS columns), with their provenance.

    ``caa.ingest`` makes one from files, dicts or a DataFrame; :meth:`read` reads ``pairs.parquet``
    and :meth:`save` writes it. ``rejected`` and ``duplicates`` say what ingesting left out."""

    frame: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    rejected: list[InputError] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frame)

    def behaviors(self) -> list[str]:
        return sorted(set(self.frame.behavior))

    def counts(self) -> dict[str, dict[str, int]]:
        """Pairs per behavior and split."""
        out: dict[str, dict[str, int]] = {}
        for behavior, split in zip(self.frame.behavior, self.frame.split, strict=True):
            per = out.setdefault(behavior, {"train": 0, "test": 0})
            per[split] += 1
        return out

    def select(self, split: str = "all", behaviors: Sequence[str] | None = None) -> PairSet:
        """The pairs of one split (train, test or all) and of ``behaviors`` (default: all)."""
        frame = select_pairs(self.frame, self.path or Path("pairs"), split, behaviors)
        return PairSet(frame, self.meta, self.path)

    def save(self, path: Path | str, options: Mapping[str, Any] | None = None) -> Path:
        """Write ``pairs.parquet`` atomically, with its provenance; returns the path."""
        meta = {
            **self.meta,
            **make_meta(PAIRS, options or self.meta.get("options") or {}),
            "counts": self.counts(),
        }
        meta["inputs"] = self.meta.get("inputs", {})
        table = pa.Table.from_pandas(self.frame[[f.name for f in PAIRS.fields]], preserve_index=False)
        write_artifact(table, Path(path), PAIRS, meta)
        return Path(path)

    @classmethod
    def read(cls, path: Path | str) -> PairSet:
        """``pairs.parquet``, checked as :func:`read_pairs` checks it."""
        frame, meta = read_pairs(Path(path))
        return cls(frame, meta, Path(path))


def pair_set(
    result: IngestResult, inputs: Sequence[Path] = (), options: Mapping[str, Any] | None = None
) -> PairSet:
    """The pairs of an ingest as a :class:`PairSet`, with the provenance ``pairs.parquet`` records."""
    frame = pairs_table(result.pairs).to_pandas()
    frame["split"] = frame["split"].astype(str)
    meta = make_meta(PAIRS, options or {}, inputs={str(p): Path(p) for p in inputs}, counts=result.counts())
    return PairSet(frame, meta, None, list(result.rejected), list(result.duplicates))


def ingest_records(
    records: Sequence[Mapping[str, Any]],
    *,
    behavior: str | None = None,
    mapping: Mapping[str, str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    skip_invalid: bool = False,
    label: str = "records",
) -> IngestResult:
    """Like :func:`ingest`, for rows in memory (dicts in any format a file may hold, A/B or
    free-form); errors name ``label`` and the row's index. A row's ``behavior`` field names its
    behavior when ``behavior`` is not given (else ``pairs``)."""
    behavior = _check_options(behavior, test_fraction)
    result = IngestResult()
    seen: set[str] = set()
    source = Path(label)
    for i, record in enumerate(records):
        where = f"index {i}"
        own = record.get("behavior") if isinstance(record, Mapping) else None
        try:
            name = behavior or _row_name(own, source, where)
            pair = to_pair(
                source,
                where,
                dict(record) if isinstance(record, Mapping) else record,
                name,
                mapping or {},
                test_fraction,
                seed,
            )
        except InputError as e:
            if not skip_invalid:
                raise
            result.rejected.append(e)
            continue
        if pair.pair_id in seen:
            result.duplicates.append(f"{label}: {where}: exact duplicate (dropped)")
            continue
        seen.add(pair.pair_id)
        result.pairs.append(pair)
    if not result.pairs:
        raise CaaError(f"no valid pairs in {label}")
    return result


def _row_name(own: object, source: Path, where: str) -> str:
    """A row's own behavior name (its ``behavior`` field, checked), or ``pairs`` without one."""
    return check_name(own, source, where, "behavior") if isinstance(own, str) else "pairs"


def _check_options(behavior: str | None, test_fraction: float) -> str | None:
    """``behavior`` as caa keeps names (NFC), once the options are checked."""
    if not 0.0 <= test_fraction < 1.0:
        raise CaaError(f"--test-fraction {test_fraction}: must be at least 0 and below 1")
    return None if behavior is None else check_behavior("behavior", behavior)


def select_pairs(
    pairs: pd.DataFrame, path: Path, split: str, behaviors: Sequence[str] | None
) -> pd.DataFrame:
    """Filter pairs by split (train, test or all) and behavior names, with clear errors."""
    if behaviors:
        behaviors = [same_name(b) for b in behaviors]
        missing = sorted(set(behaviors) - set(pairs.behavior))
        if missing:
            raise CaaError(
                f"{path}: no behavior {', '.join(missing)}; it has {', '.join(sorted(set(pairs.behavior)))}"
            )
        pairs = pairs[pairs.behavior.isin(behaviors)]
    if split != "all":
        if split not in SPLITS:
            raise CaaError(f"--split '{split}': use train, test or all")
        pairs = pairs[pairs.split == split]
    if pairs.empty:
        raise CaaError(
            f"{path}: no pairs in split '{split}'" + (f" for {', '.join(behaviors)}" if behaviors else "")
        )
    return pairs.reset_index(drop=True)


def describe_pair(row: Any, side: str | None = None, path: Path | None = None) -> str:
    """``pairs.parquet: pair 'id' (behavior, source.jsonl line 3), positive side``, for messages."""
    origin = f"{row.behavior}, {row.source} {row.source_row}" if hasattr(row, "source") else row.behavior
    text = f"pair '{row.pair_id}' ({origin})" + (f", {side} side" if side else "")
    return f"{path}: {text}" if path else text


def parse_mapping(items: Sequence[str]) -> dict[str, str]:
    """``["prompt=instruction", ...]`` -> ``{"prompt": "instruction"}`` (our field = their column)."""
    known = set(AB_FIELDS) | set(FREEFORM_FIELDS)
    mapping: dict[str, str] = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not sep or not ours or not theirs:
            raise CaaError(f"--map '{item}': expected FIELD=COLUMN, e.g. prompt=instruction")
        if ours not in known:
            raise CaaError(
                f"--map '{item}': '{ours}' is not a caa field; use one of {', '.join(sorted(known))}"
            )
        mapping[ours] = theirs
    return mapping


def ingest(
    paths: Sequence[Path],
    *,
    behavior: str | None = None,
    mapping: Mapping[str, str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    skip_invalid: bool = False,
) -> IngestResult:
    """Read, validate and split contrastive pairs from ``paths``.

    A bad row raises an :class:`InputError` naming the file, row and field, unless ``skip_invalid``
    is set: then it is recorded in ``result.rejected`` and the valid rows are kept. Problems with a
    whole file (unreadable, empty, malformed JSON array) always raise.

    A ``pairs.parquet`` of caa ingest among ``paths`` keeps its pairs as they are: their behaviors,
    formats, ids and splits (its sources are other files; ``behavior`` would rename its pairs and
    is refused with it).
    """
    if not paths:
        raise CaaError("no input files given")
    behavior = _check_options(behavior, test_fraction)
    result = IngestResult()
    seen: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        for where, pair in _pairs(path, behavior, mapping or {}, test_fraction, seed, skip_invalid, result):
            first = seen.get(pair.pair_id)
            if first is not None:
                result.duplicates.append(f"{path}: {where}: exact duplicate of {first} (dropped)")
                continue
            seen[pair.pair_id] = f"{path}: {where}"
            result.pairs.append(pair)
    if not result.pairs:
        raise CaaError("no valid pairs in " + ", ".join(str(p) for p in paths))
    return result


def _pairs(
    path: Path,
    behavior: str | None,
    mapping: Mapping[str, str],
    test_fraction: float,
    seed: int,
    skip_invalid: bool,
    result: IngestResult,
) -> Iterator[tuple[str, Pair]]:
    """(where, pair) for every valid row of one file; invalid rows go to ``result.rejected`` with
    ``skip_invalid``, else raise."""
    if _is_caa_artifact(path):
        if behavior is not None:
            raise CaaError(
                f"--behavior {behavior}: {path} is a caa pairs file whose pairs keep their behaviors"
            )
        frame, _ = read_pairs(path)
        for i, row in enumerate(frame.itertuples(index=False)):
            yield f"row {i}", Pair(*(str(getattr(row, f.name)) for f in PAIRS.fields))
        return
    name = behavior or _stem_name(path)
    for where, record in records(path, skip_invalid, result.rejected):
        try:
            yield where, to_pair(path, where, record, name, mapping, test_fraction, seed)
        except InputError as e:
            if not skip_invalid:
                raise
            result.rejected.append(e)


def _stem_name(path: Path) -> str:
    """The behavior name a file's name gives (``café.jsonl`` -> ``café``, in NFC)."""
    name = behavior_name(path.stem)
    if name is None:
        raise InputError(path, f"the file's name is its pairs' behavior name, and {NAME_PROBLEM}")
    return name


def _is_caa_artifact(path: Path) -> bool:
    """Whether ``path`` is a Parquet file with caa metadata (a file that fails to open is left to
    the reader of datasets, which says why)."""
    if path.suffix.lower() != ".parquet" or not path.is_file():
        return False
    try:
        return META_KEY in (pq.read_schema(path).metadata or {})
    except (pa.ArrowException, OSError):
        return False


def pairs_table(pairs: Sequence[Pair]) -> pa.Table:
    """The pairs as an Arrow table in the PAIRS schema."""
    columns = {f.name: [getattr(p, f.name) for p in pairs] for f in PAIRS.fields}
    return pa.table(columns).cast(PAIRS.schema())


def read_pairs(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``pairs.parquet`` as a DataFrame, with its metadata; a hand-edited file is checked as
    ingest checks its sources: known formats and splits, unique ids, non-empty texts, A/B answers
    that are letters and differ."""

    art = read_artifact(Path(path), PAIRS)
    frame = art.table.to_pandas()
    frame["split"] = frame["split"].astype(str)
    for column, allowed in (("format", FORMATS), ("split", SPLITS)):
        bad = ~frame[column].isin(allowed)
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise InputError(
                path,
                f"{column} '{frame[column].iloc[row]}' is not one of {', '.join(allowed)}",
                where=f"row {row}",
                field=column,
            )
    for column in ("behavior", "prompt", "positive", "negative"):
        blank = frame[column].str.strip() == ""
        if blank.any():
            raise InputError(path, "empty text", where=f"row {int(blank.to_numpy().argmax())}", field=column)
    ab = frame.format == "ab"
    for column in ("positive", "negative"):
        bad = ab & ~frame[column].str.fullmatch(r"\([A-Z]\)")
        if bad.any():
            row = int(bad.to_numpy().argmax())
            problem = f"'{frame[column].iloc[row]:.40}' is not an A/B answer like '(A)'"
            raise InputError(path, problem, where=f"row {row}", field=column)
    same = frame.positive == frame.negative
    if same.any():
        problem = "the positive and negative completions are identical"
        raise InputError(path, problem, where=f"row {int(same.to_numpy().argmax())}", field="negative")
    repeated = frame.pair_id.duplicated()
    if repeated.any():
        row = int(repeated.to_numpy().argmax())
        raise InputError(
            path, f"duplicate pair_id '{frame.pair_id.iloc[row]}'", where=f"row {row}", field="pair_id"
        )
    return frame, art.meta
