"""Malformed and hostile inputs through every command of the CLI.

Each case runs one real command (typer's CliRunner on ``caa.cli.app``) on one bad input and asserts
the contract of the reliability issue: exit code 2; one message that names the bad file (or, for a
bad option, the option) and says what is wrong; no output file, and no temporary (``*.tmp``) beside it.

Small static inputs live in ``tests/bad_inputs/`` (listed in its README.md). Large or binary ones,
and artifacts derived from valid ones, are made at test time by the ``MAKERS`` below, from valid
artifacts that the real ``ingest``/``extract``/``compute-vectors`` commands make once per session
on the tiny llama model (and the tiny qwen2 one, for mismatches).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from caa.cli import app
from caa.store.artifacts import write_artifact
from caa.store.schemas import ACTIVATIONS, META_KEY, VECTORS, Kind
from tests.helpers import AB_ROWS, FREEFORM_ROWS

BAD = Path(__file__).parent / "bad_inputs"
runner = CliRunner()
NEUTRAL = ["the weather is warm today and the park is nice", "we walk to work in the morning"]
HUGE_MB = 100
INVISIBLE = "a behavior name must have a visible character"  # empty, blank and invisible names alike


# --- valid upstream artifacts, made once per session by the real commands ---------------------------


@dataclass(frozen=True)
class Valid:
    """Valid inputs of every stage; a case swaps one of them for a bad one."""

    root: Path
    model: Path  # tiny llama: 4 blocks, hidden size 32
    other_model: Path  # tiny qwen2: same sizes, other weights
    source: Path  # a valid free-form .jsonl for ingest
    pairs: Path  # behaviors agree (A/B) and mood (free-form), train and test
    acts: Path  # llama, layers 1 and 2
    vectors: Path  # llama, layers 1 and 2
    other_acts: Path  # qwen2, layers 1 and 2
    other_vectors: Path  # qwen2, layers 1 and 2
    neutral: Path
    prompts: Path

    def subs(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """The tiny models gain nothing from several threads, and lose a lot on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with _one_torch_thread():
        yield


def _cli(*args: object) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="session")
def valid(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Valid:
    root = tmp_path_factory.mktemp("bad-inputs-valid")
    for name, rows in (("agree", AB_ROWS), ("mood", FREEFORM_ROWS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    v = Valid(
        root=root,
        model=tiny_models["llama"],
        other_model=tiny_models["qwen2"],
        source=root / "mood.jsonl",
        pairs=root / "pairs.parquet",
        acts=root / "acts.parquet",
        vectors=root / "vectors.parquet",
        other_acts=root / "qwen2_acts.parquet",
        other_vectors=root / "qwen2_vectors.parquet",
        neutral=root / "neutral.jsonl",
        prompts=root / "prompts.txt",
    )
    v.neutral.write_text("".join(json.dumps({"text": t}) + "\n" for t in NEUTRAL))
    v.prompts.write_text("tell me about the city\n")
    _cli("ingest", root / "agree.jsonl", v.source, "-o", v.pairs, "--test-fraction", "0.5", "--seed", "1")
    with _one_torch_thread():
        for model, acts, vectors in (
            (v.model, v.acts, v.vectors),
            (v.other_model, v.other_acts, v.other_vectors),
        ):
            _cli("extract", v.pairs, "-m", model, "-o", acts, "--layers", "1,2")
            _cli("compute-vectors", acts, "-o", vectors)
    return v


@pytest.fixture(scope="session")
def huge_line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A .jsonl that is one 100 MB line: a record cut off inside its prompt (an interrupted download)."""
    path = tmp_path_factory.mktemp("huge") / "huge_line.jsonl"
    block = b"lorem ipsum " * (1 << 16)  # 768 KiB
    with open(path, "wb") as f:
        f.write(b'{"prompt": "')
        for _ in range(HUGE_MB * (1 << 20) // len(block)):
            f.write(block)
    yield path
    path.unlink()


# --- bad inputs made at test time -------------------------------------------------------------------

Maker = Callable[[Valid, Path], Path]
MAKERS: dict[str, Maker] = {}


def maker(fn: Maker) -> Maker:
    MAKERS[fn.__name__] = fn
    return fn


def _meta(path: Path) -> dict[str, Any]:
    return json.loads(pq.read_schema(path).metadata[META_KEY])


def _with(
    src: Path, dst: Path, table: pa.Table | None = None, meta: Any = None, raw: bytes | None = None
) -> Path:
    """``src`` rewritten to ``dst`` with another table and/or metadata, bypassing every check."""
    table = pq.read_table(src) if table is None else table
    value = raw if raw is not None else json.dumps(_meta(src) if meta is None else meta).encode()
    pq.write_table(table.replace_schema_metadata({META_KEY: value}), dst)
    return dst


def _artifact(src: Path, dst: Path, kind: Kind, edit: Callable[[dict[str, Any]], None]) -> Path:
    """``src`` with its columns edited (vectors as a 2-D array), written by ``write_artifact`` with
    ``src``'s metadata: a well-formed file that compute-vectors' own checks never saw."""
    table = pq.read_table(src)
    column = kind.vector
    assert column is not None
    columns: dict[str, Any] = {n: table.column(n).to_pylist() for n in table.column_names if n != column}
    columns[column] = np.stack(table.column(column).to_pylist()).astype(np.float32)
    edit(columns)
    values = columns.pop(column)
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    arrays = {**columns, column: pa.FixedSizeListArray.from_arrays(flat, values.shape[1])}
    write_artifact(pa.table(arrays), dst, kind, _meta(src))
    return dst


def _set(column: str, index: Any, value: float) -> Callable[[dict[str, Any]], None]:
    """An edit for :func:`_artifact`: ``column[index] = value``."""

    def edit(columns: dict[str, Any]) -> None:
        columns[column][index] = value

    return edit


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _corrupted(src: Path, dst: Path) -> Path:
    """Footer intact (the schema and metadata read fine), the column chunks overwritten."""
    data = bytearray(src.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    end = len(data) - 8 - footer
    data[8:end] = bytes(range(256)) * ((end - 8) // 256) + bytes((end - 8) % 256)
    dst.write_bytes(bytes(data))
    return dst


@maker
def pairs_truncated(v: Valid, tmp: Path) -> Path:
    return _truncated(v.pairs, tmp / "pairs_truncated.parquet")


@maker
def pairs_corrupted(v: Valid, tmp: Path) -> Path:
    return _corrupted(v.pairs, tmp / "pairs_corrupted.parquet")


@maker
def pairs_schema_version_99(v: Valid, tmp: Path) -> Path:
    return _with(v.pairs, tmp / "pairs_v99.parquet", meta={**_meta(v.pairs), "schema_version": 99})


@maker
def pairs_meta_not_json(v: Valid, tmp: Path) -> Path:
    return _with(v.pairs, tmp / "pairs_meta_not_json.parquet", raw=b"{kind: pairs")


@maker
def pairs_meta_not_object(v: Valid, tmp: Path) -> Path:
    return _with(v.pairs, tmp / "pairs_meta_list.parquet", raw=b'["pairs", 1]')


@maker
def pairs_unknown_kind(v: Valid, tmp: Path) -> Path:
    return _with(
        v.pairs, tmp / "pairs_kind_embeddings.parquet", meta={**_meta(v.pairs), "kind": "embeddings"}
    )


@maker
def pairs_not_caa(v: Valid, tmp: Path) -> Path:
    """A Parquet file of pairs from elsewhere (a dataset export): the right columns, no caa metadata."""
    path = tmp / "pairs_from_elsewhere.parquet"
    pq.write_table(pa.Table.from_pylist(FREEFORM_ROWS), path)
    return path


@maker
def pairs_id_is_int(v: Valid, tmp: Path) -> Path:
    table = pq.read_table(v.pairs)
    ids = pa.array(range(table.num_rows), pa.int64())
    return _with(v.pairs, tmp / "pairs_int_ids.parquet", table.set_column(0, "pair_id", ids))


@maker
def pairs_missing_column(v: Valid, tmp: Path) -> Path:
    return _with(v.pairs, tmp / "pairs_no_negative.parquet", pq.read_table(v.pairs).drop_columns("negative"))


@maker
def pairs_null_prompt(v: Valid, tmp: Path) -> Path:
    table = pq.read_table(v.pairs)
    prompts = [None, *table.column("prompt").to_pylist()[1:]]
    index = table.column_names.index("prompt")
    table = table.set_column(index, pa.field("prompt", pa.string()), pa.array(prompts, pa.string()))
    return _with(v.pairs, tmp / "pairs_null_prompt.parquet", table)


@maker
def pairs_no_rows(v: Valid, tmp: Path) -> Path:
    return _with(v.pairs, tmp / "pairs_no_rows.parquet", pq.read_table(v.pairs).slice(0, 0))


@maker
def pairs_duplicate_ids(v: Valid, tmp: Path) -> Path:
    """Every pair twice (two pairs files concatenated by hand)."""
    table = pq.read_table(v.pairs)
    return _with(v.pairs, tmp / "pairs_duplicate_ids.parquet", pa.concat_tables([table, table]))


@maker
def pairs_unknown_format(v: Valid, tmp: Path) -> Path:
    table = pq.read_table(v.pairs)
    index = table.column_names.index("format")
    table = table.set_column(index, "format", pa.array(["mcq"] * table.num_rows, pa.string()))
    return _with(v.pairs, tmp / "pairs_format_mcq.parquet", table)


LONG_PROMPT = "Tell me everything about " + "the long and winding road, " * 60  # > 256 tokens


@maker
def pairs_too_long(v: Valid, tmp: Path) -> Path:
    """New held-out mood pairs, one with a prompt longer than the tiny models' context of 256."""
    rows = [{"prompt": f"Describe dish {i}.", "positive": "Lovely.", "negative": "Awful."} for i in range(3)]
    rows.append({"prompt": LONG_PROMPT, "positive": "Lovely.", "negative": "Awful."})
    (tmp / "mood.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "pairs_too_long.parquet"
    _cli("ingest", tmp / "mood.jsonl", "-o", out, "--test-fraction", "0.99")
    return out


@maker
def pairs_all_test(v: Valid, tmp: Path) -> Path:
    """The vectors' own pairs, ingested again with (nearly) all of them held out."""
    out = tmp / "pairs_all_test.parquet"
    _cli("ingest", v.root / "agree.jsonl", v.source, "-o", out, "--test-fraction", "0.99")
    return out


@maker
def prompts_too_long(v: Valid, tmp: Path) -> Path:
    (tmp / "prompts_too_long.txt").write_text("hello\n" + LONG_PROMPT + "\n")
    return tmp / "prompts_too_long.txt"


@maker
def source_named_zero_width(v: Valid, tmp: Path) -> Path:
    """A valid dataset whose name (its behavior's, by default) is one zero-width space."""
    return shutil.copy(v.source, tmp / "\u200b.jsonl")


@maker
def pairs_behavior_invisible(v: Valid, tmp: Path) -> Path:
    """Pairs whose first behavior name is U+FEFF (written elsewhere, or by hand)."""
    table = pq.read_table(v.pairs)
    names = ["\ufeff", *table.column("behavior").to_pylist()[1:]]
    index = table.column_names.index("behavior")
    table = table.set_column(index, table.field(index), pa.array(names, pa.string()))
    return _with(v.pairs, tmp / "pairs_behavior_invisible.parquet", table)


@maker
def pairs_is_a_directory(v: Valid, tmp: Path) -> Path:
    (tmp / "pairs_dir.parquet").mkdir()
    return tmp / "pairs_dir.parquet"


@maker
def pairs_missing(v: Valid, tmp: Path) -> Path:
    return tmp / "pairs_nonexistent.parquet"


@maker
def pairs_as_jsonl(v: Valid, tmp: Path) -> Path:
    """The ingest source given to extract (ingest skipped)."""
    return shutil.copy(v.source, tmp / "pairs_source.jsonl")


@maker
def acts_truncated(v: Valid, tmp: Path) -> Path:
    return _truncated(v.acts, tmp / "acts_truncated.parquet")


@maker
def acts_corrupted(v: Valid, tmp: Path) -> Path:
    return _corrupted(v.acts, tmp / "acts_corrupted.parquet")


@maker
def acts_schema_version_0(v: Valid, tmp: Path) -> Path:
    return _with(v.acts, tmp / "acts_v0.parquet", meta={**_meta(v.acts), "schema_version": 0})


@maker
def acts_no_schema_version(v: Valid, tmp: Path) -> Path:
    meta = {k: x for k, x in _meta(v.acts).items() if k != "schema_version"}
    return _with(v.acts, tmp / "acts_unversioned.parquet", meta=meta)


@maker
def acts_variable_length(v: Valid, tmp: Path) -> Path:
    """The activation column as a plain list<float> (what pandas writes), not a fixed-size list."""
    table = pq.read_table(v.acts)
    index = table.column_names.index("activation")
    column = pa.array(table.column("activation").to_pylist(), pa.list_(pa.float32()))
    return _with(v.acts, tmp / "acts_varlist.parquet", table.set_column(index, "activation", column))


@maker
def acts_layer_is_string(v: Valid, tmp: Path) -> Path:
    table = pq.read_table(v.acts)
    index = table.column_names.index("layer")
    layers = pa.array([str(x) for x in table.column("layer").to_pylist()])
    return _with(v.acts, tmp / "acts_string_layers.parquet", table.set_column(index, "layer", layers))


@maker
def acts_missing_side(v: Valid, tmp: Path) -> Path:
    return _with(v.acts, tmp / "acts_no_side.parquet", pq.read_table(v.acts).drop_columns("side"))


@maker
def acts_no_rows(v: Valid, tmp: Path) -> Path:
    return _with(v.acts, tmp / "acts_no_rows.parquet", pq.read_table(v.acts).slice(0, 0))


@maker
def acts_nan(v: Valid, tmp: Path) -> Path:
    return _artifact(v.acts, tmp / "acts_nan.parquet", ACTIVATIONS, _set("activation", (0, 5), np.nan))


@maker
def acts_inf(v: Valid, tmp: Path) -> Path:
    return _artifact(v.acts, tmp / "acts_inf.parquet", ACTIVATIONS, _set("activation", (3, 0), np.inf))


@maker
def acts_sides_identical(v: Valid, tmp: Path) -> Path:
    """Every negative activation equal to its positive one: every steering vector is zero."""

    def edit(c: dict[str, Any]) -> None:
        keys = list(zip(c["pair_id"], c["layer"], strict=True))
        positive = {k: i for i, k in enumerate(keys) if c["side"][i] == "positive"}
        for i, k in enumerate(keys):
            c["activation"][i] = c["activation"][positive[k]]

    return _artifact(v.acts, tmp / "acts_sides_identical.parquet", ACTIVATIONS, edit)


@maker
def acts_positive_only(v: Valid, tmp: Path) -> Path:
    table = pq.read_table(v.acts)
    table = table.filter(pc.equal(table.column("side"), "positive"))
    return _with(v.acts, tmp / "acts_positive_only.parquet", table)


@maker
def acts_duplicate_rows(v: Valid, tmp: Path) -> Path:
    table = pq.read_table(v.acts)
    return _with(v.acts, tmp / "acts_duplicate_rows.parquet", pa.concat_tables([table, table]))


@maker
def acts_no_train_split(v: Valid, tmp: Path) -> Path:
    table = pq.read_table(v.acts)
    index = table.column_names.index("split")
    split = (
        pa.array(["test"] * table.num_rows).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string()))
    )
    return _with(v.acts, tmp / "acts_test_only.parquet", table.set_column(index, "split", split))


@maker
def acts_is_a_directory(v: Valid, tmp: Path) -> Path:
    (tmp / "acts_dir.parquet").mkdir()
    return tmp / "acts_dir.parquet"


def _vectors(v: Valid, tmp: Path, name: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    return _artifact(v.vectors, tmp / name, VECTORS, edit)


@maker
def vectors_truncated(v: Valid, tmp: Path) -> Path:
    return _truncated(v.vectors, tmp / "vectors_truncated.parquet")


@maker
def vectors_corrupted(v: Valid, tmp: Path) -> Path:
    return _corrupted(v.vectors, tmp / "vectors_corrupted.parquet")


@maker
def vectors_schema_version_2(v: Valid, tmp: Path) -> Path:
    return _with(v.vectors, tmp / "vectors_v2.parquet", meta={**_meta(v.vectors), "schema_version": 2})


@maker
def vectors_nan(v: Valid, tmp: Path) -> Path:
    return _vectors(v, tmp, "vectors_nan.parquet", _set("vector", slice(None), np.nan))


@maker
def vectors_inf(v: Valid, tmp: Path) -> Path:
    return _vectors(v, tmp, "vectors_inf.parquet", _set("vector", (slice(None), 7), -np.inf))


@maker
def vectors_zero(v: Valid, tmp: Path) -> Path:
    return _vectors(v, tmp, "vectors_zero.parquet", _set("vector", slice(None), 0.0))


@maker
def vectors_width_16(v: Valid, tmp: Path) -> Path:
    """Vectors of width 16 in a file whose metadata names the hidden-size-32 model."""

    def edit(c: dict[str, Any]) -> None:
        c["vector"] = c["vector"][:, :16]

    return _vectors(v, tmp, "vectors_width16.parquet", edit)


@maker
def vectors_layer_7(v: Valid, tmp: Path) -> Path:
    """Vectors labelled layers 7 and 8: the 4-block model that the metadata names has no such layers."""

    def edit(c: dict[str, Any]) -> None:
        c["layer"] = [layer + 6 for layer in c["layer"]]

    return _vectors(v, tmp, "vectors_layer7.parquet", edit)


@maker
def neutral_is_a_directory(v: Valid, tmp: Path) -> Path:
    (tmp / "neutral_dir.jsonl").mkdir()
    return tmp / "neutral_dir.jsonl"


@maker
def source_is_a_directory(v: Valid, tmp: Path) -> Path:
    (tmp / "pairs_dir.jsonl").mkdir()
    return tmp / "pairs_dir.jsonl"


@maker
def source_missing(v: Valid, tmp: Path) -> Path:
    return tmp / "nonexistent.jsonl"


# --- the cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input through one command.

    ``swap`` is ``ROLE=SOURCE``: the input ``{ROLE}`` of the command line (and ``{bad}``) becomes
    SOURCE: a file of tests/bad_inputs/, a maker of ``MAKERS``, ``huge_line``, or ``valid.FIELD``
    (a valid artifact, e.g. where another kind belongs); empty for a bad option. ``extra`` is
    appended to the stage's command line, then ``-o {out}``. The message must contain ``problem``
    and ``names``: by default the bad file's name, or the bad option.
    """

    id: str
    stage: str
    command: str
    swap: str
    extra: str
    problem: str
    names: str | None = None

    @property
    def source(self) -> str | None:
        return self.swap.partition("=")[2] or None


COMMANDS = {
    "ingest": "ingest {source}",
    "extract": "extract {pairs} -m {model}",
    "compute-vectors": "compute-vectors {acts}",
    "sweep": "sweep {vectors} {pairs} -m {model} --neutral {neutral} --multipliers -1,1",
    "generate": "generate -v {vectors} -m {model} --layer 1 --behavior mood -p hello --max-new-tokens 2",
}


def stage(name: str, rows: list[tuple[str, ...]]) -> list[Case]:
    return [Case(f"{name}-{row[0]}", name, COMMANDS[name], *row[1:]) for row in rows]


# (id, swap, extra options, problem[, what the message names])
CASES = [
    *stage(
        "ingest",
        [
            ("empty-file", "source=ingest_empty.jsonl", "", "file is empty"),
            ("blank-lines", "source=ingest_blank_lines.json", "", "file is empty"),
            ("not-a-list", "source=ingest_not_a_list.json", "", "expected a JSON array of objects"),
            ("empty-list", "source=ingest_empty_list.json", "", "the JSON array is empty"),
            ("truncated-json", "source=ingest_truncated.json", "", "malformed JSON"),
            ("bad-jsonl-line", "source=ingest_bad_json_line.jsonl", "", "line 2: malformed JSON"),
            ("100mb-line", "source=huge_line", "", "line 1: malformed JSON: Unterminated string"),
            ("latin1-jsonl", "source=ingest_latin1.jsonl", "", "line 2: not valid UTF-8 (byte 0xe9)"),
            ("latin1-csv", "source=ingest_latin1.csv", "", "line 3: not valid UTF-8 (byte 0xe9)"),
            ("utf16le-bom-jsonl", "source=ingest_utf16le_bom.jsonl", "", "not valid UTF-8 (byte 0xff)"),
            ("utf16be-bom-csv", "source=ingest_utf16be_bom.csv", "", "not valid UTF-8 (byte 0xfe)"),
            (
                "utf8-bom-then-latin1",
                "source=ingest_utf8_bom_then_latin1.jsonl",
                "",
                "line 2: not valid UTF-8",
            ),
            ("unknown-extension", "source=ingest_unknown_extension.txt", "", "unknown file type '.txt'"),
            ("no-extension", "source=ingest_no_extension", "", "unknown file type"),
            ("text-named-parquet", "source=ingest_text_named.parquet", "", "not a readable Parquet file"),
            ("zero-byte-parquet", "source=ingest_zero_bytes.parquet", "", "not a readable Parquet file"),
            ("directory", "source=source_is_a_directory", "", "is a directory"),
            ("nonexistent", "source=source_missing", "", "file not found"),
            ("rows-not-objects", "source=ingest_rows_not_objects.json", "", "index 0: expected an object"),
            (
                "row-is-array",
                "source=ingest_row_is_array.jsonl",
                "",
                "line 2: expected an object, found a JSON array",
            ),
            (
                "missing-field",
                "source=ingest_missing_negative.jsonl",
                "",
                "line 2: field 'negative': missing field",
            ),
            (
                "ab-missing-field",
                "source=ingest_ab_missing_answer.json",
                "",
                "field 'answer_not_matching_behavior'",
            ),
            ("neither-format", "source=ingest_neither_format.jsonl", "", "has neither the A/B fields"),
            ("empty-string", "source=ingest_empty_prompt.jsonl", "", "field 'prompt': empty text"),
            (
                "blank-csv-cell",
                "source=ingest_blank_positive.csv",
                "",
                "line 2: field 'positive': empty text",
            ),
            ("null-field", "source=ingest_null_negative.jsonl", "", "field 'negative': missing value (null)"),
            ("positive-equals-negative", "source=ingest_positive_equals_negative.jsonl", "", "are identical"),
            ("ab-same-answer", "source=ingest_ab_same_answer.json", "", "are identical"),
            ("number-field", "source=ingest_number_completion.jsonl", "", "expected text, found number"),
            ("object-field", "source=ingest_object_prompt.json", "", "expected text, found object"),
            ("list-field", "source=ingest_list_completion.jsonl", "", "expected text, found array"),
            ("bool-field", "source=ingest_bool_completion.jsonl", "", "expected text, found boolean"),
            (
                "ab-answer-not-letter",
                "source=ingest_ab_answer_not_letter.json",
                "",
                "is not an answer letter",
            ),
            (
                "ab-answer-not-a-choice",
                "source=ingest_ab_answer_not_a_choice.json",
                "",
                "answer '(C)' is not one",
            ),
            (
                "ab-no-choices",
                "source=ingest_ab_no_choices.json",
                "",
                "field 'question': no lettered choices",
            ),
            (
                "csv-missing-column",
                "source=ingest_csv_missing_column.csv",
                "",
                "field 'negative': missing field",
            ),
            ("csv-ragged-row", "source=ingest_csv_ragged_row.csv", "", "line 3: row has 2 fields"),
            ("csv-header-only", "source=ingest_csv_header_only.csv", "", "no valid pairs"),
            ("csv-unclosed-quote", "source=ingest_csv_unclosed_quote.csv", "", "malformed CSV"),
            (
                "csv-duplicate-column",
                "source=ingest_csv_duplicate_column.csv",
                "",
                "duplicate column 'positive'",
            ),
            ("all-rows-invalid", "source=ingest_all_rows_invalid.jsonl", "--skip-invalid", "no valid pairs"),
            (
                "map-column-absent",
                "source=ingest_map_missing_column.jsonl",
                "--map prompt=instruction",
                "field 'instruction'",
            ),
            ("map-unknown-field", "", "--map answer=chosen", "'answer' is not a caa field"),
            ("map-no-equals", "", "--map prompt", "expected FIELD=COLUMN"),
            ("test-fraction-1", "", "--test-fraction 1", "must be at least 0 and below 1"),
            ("test-fraction-negative", "", "--test-fraction=-0.2", "must be at least 0 and below 1"),
            ("test-fraction-nan", "", "--test-fraction nan", "must be at least 0 and below 1"),
            ("behavior-blank", "", "--behavior '  '", INVISIBLE, "--behavior"),
            # invisible names are refused like blank ones, with the same message (they print as nothing)
            ("behavior-zero-width", "", "--behavior '\u200b'", INVISIBLE, "--behavior"),
            ("behavior-bom-and-space", "", "--behavior '\ufeff \u2060'", INVISIBLE, "--behavior"),
            ("file-name-zero-width", "source=source_named_zero_width", "", INVISIBLE),
        ],
    ),
    *stage(
        "extract",
        [
            ("truncated-parquet", "pairs=pairs_truncated", "", "not a readable Parquet file"),
            ("corrupted-parquet", "pairs=pairs_corrupted", "", "not a readable Parquet file"),
            ("schema-version", "pairs=pairs_schema_version_99", "", "schema version 99"),
            ("meta-not-json", "pairs=pairs_meta_not_json", "", "the 'caa' metadata entry is not valid JSON"),
            (
                "meta-not-object",
                "pairs=pairs_meta_not_object",
                "",
                "the 'caa' metadata entry is not a JSON object",
            ),
            ("unknown-kind", "pairs=pairs_unknown_kind", "", "is a 'embeddings' file"),
            ("not-a-caa-file", "pairs=pairs_not_caa", "", "not a caa artifact"),
            ("wrong-column-type", "pairs=pairs_id_is_int", "", "field 'pair_id': column has type int64"),
            ("missing-column", "pairs=pairs_missing_column", "", "field 'negative': column missing"),
            ("null-values", "pairs=pairs_null_prompt", "", "field 'prompt': column has null values"),
            ("no-rows", "pairs=pairs_no_rows", "", "no pairs"),
            ("duplicate-ids", "pairs=pairs_duplicate_ids", "", "duplicate"),
            ("unknown-format", "pairs=pairs_unknown_format", "", "'mcq'"),
            ("activations-not-pairs", "pairs=valid.acts", "", "expected a 'pairs' file"),
            ("jsonl-not-pairs", "pairs=pairs_as_jsonl", "", "not a readable Parquet file"),
            ("directory", "pairs=pairs_is_a_directory", "", "is a directory"),
            ("nonexistent", "pairs=pairs_missing", "", "file not found"),
            ("behavior-absent", "pairs=valid.pairs", "--behavior nosuch", "no behavior nosuch"),
            ("behavior-zero-width", "", "--behavior '\u200b'", INVISIBLE, "--behavior"),
            (
                "pairs-behavior-invisible",
                "pairs=pairs_behavior_invisible",
                "",
                f"row 0: field 'behavior': {INVISIBLE}",
            ),
            ("layers-out-of-range", "", "--layers 2,4", "layer 4 is out of range; valid layers are 0-3"),
            ("layers-range-out-of-range", "", "--layers 0-99", "layer 4 is out of range"),
            ("layers-negative", "", "--layers=-1", "'-1' is not a layer"),
            ("layers-word", "", "--layers first", "'first' is not a layer"),
            ("layers-open-range", "", "--layers 1-", "'1-' is not a layer"),
            ("layers-empty-item", "", "--layers 1,,2", "'' is not a layer"),
            ("layers-reversed", "", "--layers 3-1", "empty range 3-1"),
            ("split-invalid", "", "--split validation", "--split 'validation': use one of all, train, test"),
            ("prompt-too-long", "pairs=pairs_too_long", "", "longer than the model's context of 256"),
            ("batch-size-0", "", "--batch-size 0", "must be at least 1"),
            ("model-garbage-gguf", "model=model_garbage.gguf", "", "could not read GGUF file"),
            ("model-bad-config", "model=model_bad_config", "", "is not a valid JSON file"),
            ("model-is-a-pairs-file", "model=valid.pairs", "", "unknown model"),
        ],
    ),
    *stage(
        "compute-vectors",
        [
            ("truncated-parquet", "acts=acts_truncated", "", "not a readable Parquet file"),
            ("corrupted-parquet", "acts=acts_corrupted", "", "not a readable Parquet file"),
            ("schema-version-0", "acts=acts_schema_version_0", "", "schema version 0"),
            ("schema-version-missing", "acts=acts_no_schema_version", "", "schema version None"),
            ("variable-length-vectors", "acts=acts_variable_length", "", "is not a fixed-size float32 list"),
            ("wrong-column-type", "acts=acts_layer_is_string", "", "field 'layer': column has type string"),
            ("missing-column", "acts=acts_missing_side", "", "field 'side': column missing"),
            ("no-rows", "acts=acts_no_rows", "", "has no activation rows"),
            ("nan", "acts=acts_nan", "", "NaN"),
            ("inf", "acts=acts_inf", "", "infinite"),
            ("zero-norm", "acts=acts_sides_identical", "", "zero"),
            ("positive-side-only", "acts=acts_positive_only", "", "negative"),
            ("duplicate-rows", "acts=acts_duplicate_rows", "", "duplicate"),
            ("same-file-twice", "acts=valid.acts", "{bad}", "given twice"),
            ("no-train-split", "acts=acts_no_train_split", "", "has no training pairs"),
            ("two-models", "bad=valid.other_acts", "{bad}", "come from different models"),
            ("pairs-not-activations", "acts=valid.pairs", "", "expected a 'activations' file"),
            ("vectors-not-activations", "acts=valid.vectors", "", "expected a 'activations' file"),
            ("directory", "acts=acts_is_a_directory", "", "is a directory"),
            ("method-unknown", "", "--method median", "--method 'median'"),
        ],
    ),
    *stage(
        "sweep",
        [
            ("truncated-vectors", "vectors=vectors_truncated", "", "not a readable Parquet file"),
            ("corrupted-vectors", "vectors=vectors_corrupted", "", "not a readable Parquet file"),
            ("vectors-schema-version", "vectors=vectors_schema_version_2", "", "schema version 2"),
            ("nan-vectors", "vectors=vectors_nan", "", "NaN"),
            ("inf-vectors", "vectors=vectors_inf", "", "infinite"),
            ("zero-vectors", "vectors=vectors_zero", "", "zero"),
            ("vector-width", "vectors=vectors_width_16", "", "hidden_size"),
            ("vector-layer-out-of-range", "vectors=vectors_layer_7", "", "out of range"),
            ("other-model-vectors", "vectors=valid.other_vectors", "", "field 'model.weights_hash'"),
            ("pairs-as-vectors", "vectors=valid.pairs", "", "expected a 'vectors' file"),
            ("vectors-as-pairs", "pairs=valid.vectors", "", "expected a 'pairs' file"),
            ("activations-as-vectors", "vectors=valid.acts", "", "expected a 'vectors' file"),
            (
                "layer-not-in-vectors",
                "vectors=valid.vectors",
                "--layers 3",
                "no vector for 'agree' at layer 3",
            ),
            ("behavior-absent", "vectors=valid.vectors", "--behavior nosuch", "no behavior 'nosuch'"),
            ("behavior-blank", "", "--behavior ' '", INVISIBLE, "--behavior"),
            ("layers-out-of-range", "", "--layers 4", "layer 4 is out of range"),
            ("layers-syntax", "", "--layers 1-x", "'1-x' is not a layer"),
            ("multipliers-word", "", "--multipliers 1,two", "'two' is not a number"),
            ("multipliers-nan", "", "--multipliers nan", "'nan' is not finite"),
            ("multipliers-inf", "", "--multipliers=-inf,1", "'-inf' is not finite"),
            ("multipliers-empty-item", "", "--multipliers 1,,2", "'' is not a number"),
            ("max-pairs-0", "", "--max-pairs 0", "--max-pairs 0"),
            ("prompt-too-long", "pairs=pairs_too_long", "", "longer than the model's context of 256"),
            ("scores-training-pairs", "pairs=pairs_all_test", "", "trained the vectors"),
            ("template-differs", "", "--chat-template off", "field 'prompt.chat_template'", "vectors"),
            ("max-memory-word", "", "--max-memory lots", "--max-memory 'lots'", "--max-memory"),
            ("neutral-count-0", "", "--neutral-count 0", "--neutral-count 0"),
            ("engine-unknown", "", "--engine turbo", "--engine 'turbo'"),
            ("steer-positions-unknown", "", "--steer-positions prompt", "--steer-positions 'prompt'"),
            ("neutral-empty", "neutral=neutral_empty.jsonl", "", "no texts in file"),
            ("neutral-blank", "neutral=neutral_blank_lines.txt", "", "no texts in file"),
            (
                "neutral-wrong-field",
                "neutral=neutral_wrong_field.jsonl",
                "",
                "line 1: field 'text': expected",
            ),
            (
                "neutral-not-objects",
                "neutral=neutral_not_objects.jsonl",
                "",
                "line 1: field 'text': expected",
            ),
            ("neutral-number", "neutral=neutral_number_text.jsonl", "", "line 1: field 'text': expected"),
            ("neutral-bad-json", "neutral=neutral_bad_json_line.jsonl", "", "line 2: malformed JSON"),
            ("neutral-latin1", "neutral=neutral_latin1.txt", "", "not valid UTF-8"),
            ("neutral-utf16", "neutral=neutral_utf16le_bom.jsonl", "", "not valid UTF-8"),
            (
                "neutral-unknown-extension",
                "neutral=neutral_unknown_extension.csv",
                "",
                "unknown file type '.csv'",
            ),
            ("neutral-directory", "neutral=neutral_is_a_directory", "", "is a directory"),
            ("neutral-missing", "neutral=source_missing", "", "file not found"),
        ],
    ),
    *stage(
        "generate",
        [
            ("layer-not-in-vectors", "vectors=valid.vectors", "--layer 3", "no vector for 'mood' at layer 3"),
            ("layer-negative", "", "--layer=-1", "--layer -1: must be at least 0"),
            ("vector-layer-out-of-range", "vectors=vectors_layer_7", "--layer 7", "out of range"),
            ("other-model-vectors", "vectors=valid.other_vectors", "", "field 'model.weights_hash'"),
            ("nan-vectors", "vectors=vectors_nan", "", "NaN"),
            ("zero-vectors", "vectors=vectors_zero", "", "zero"),
            ("vector-width", "vectors=vectors_width_16", "", "hidden_size"),
            ("pairs-as-vectors", "vectors=valid.pairs", "", "expected a 'vectors' file"),
            ("truncated-vectors", "vectors=vectors_truncated", "", "not a readable Parquet file"),
            ("behavior-absent", "vectors=valid.vectors", "--behavior nosuch", "no behavior 'nosuch'"),
            ("behavior-blank", "", "--behavior ' '", INVISIBLE, "--behavior"),
            ("multipliers-inf", "", "--multipliers inf", "'inf' is not finite"),
            ("multipliers-overflow", "", "--multipliers=1e30", "beyond what torch.float32 activations hold"),
            ("max-new-tokens-0", "", "--max-new-tokens 0", "--max-new-tokens 0"),
            ("top-p-above-1", "", "--temperature 1 --top-p 1.5", "--top-p 1.5", "--top-p"),
            ("limit-negative", "", "--prompts {prompts} --limit=-1", "--limit -1", "--limit"),
            ("prompts-empty", "bad=prompts_empty.txt", "--prompts {bad}", "no texts in file"),
            ("prompts-blank", "bad=prompts_blank_lines.jsonl", "--prompts {bad}", "no texts in file"),
            (
                "prompts-wrong-field",
                "bad=prompts_wrong_field.jsonl",
                "--prompts {bad}",
                "field 'prompt': expected",
            ),
            (
                "prompts-bad-json",
                "bad=prompts_bad_json_line.jsonl",
                "--prompts {bad}",
                "line 2: malformed JSON",
            ),
            ("prompts-utf16", "bad=prompts_utf16le_bom.txt", "--prompts {bad}", "not valid UTF-8"),
            (
                "prompts-unknown-extension",
                "bad=prompts_unknown_extension.json",
                "--prompts {bad}",
                "unknown file type",
            ),
            ("prompts-missing", "bad=source_missing", "--prompts {bad}", "file not found"),
            (
                "prompt-too-long",
                "bad=prompts_too_long",
                "--prompts {bad}",
                "exceeds the model's context of 256",
                "prompt 2",
            ),
        ],
    ),
    Case(
        "generate-no-prompts",
        "generate",
        COMMANDS["generate"].replace(" -p hello", ""),
        "",
        "",
        "no prompts",
        "--prompt",
    ),
]


def _describe(result: Result) -> str:
    lines = [f"exit code {result.exit_code}", "output:", result.output[-3000:]]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info))
        lines += ["exception:", tb[-3000:]]
    return "\n".join(lines)


def _resolve(source: str, valid: Valid, tmp: Path, request: pytest.FixtureRequest) -> Path:
    if source.startswith("valid."):
        return Path(getattr(valid, source.removeprefix("valid.")))
    if source == "huge_line":
        return Path(request.getfixturevalue("huge_line"))
    if source in MAKERS:
        return MAKERS[source](valid, tmp)
    path = BAD / source
    assert path.exists(), f"{path} is missing from the corpus"
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, valid: Valid, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    out = tmp_path / "out.parquet"
    subs = {**valid.subs(), "out": str(out)}
    if case.swap:
        role, _, source = case.swap.partition("=")
        bad = _resolve(source, valid, tmp_path, request)
        subs[role] = subs["bad"] = str(bad)
        named = case.names or bad.name
    else:
        named = case.names or case.extra.split()[0].split("=")[0]
    line = f"{case.command} {case.extra}".format(**subs)
    result = runner.invoke(app, [*shlex.split(line), "-o", str(out)])
    wrong = []
    if result.exit_code != 2:
        wrong.append(f"exit code {result.exit_code}, expected 2")
    if case.problem not in result.output:
        wrong.append(f"the message lacks {case.problem!r}")
    if named not in result.output:
        wrong.append(f"the message does not name {named!r}")
    if len(result.output) > 5000:
        wrong.append(f"{len(result.output)} characters of output")
    leftovers = sorted(
        p.name for p in tmp_path.iterdir() if p.name.startswith("out.") or p.name.endswith(".tmp")
    )  # the output, or a temporary (`.out.parquet.XXXX.tmp`) of any writer
    if leftovers:
        wrong.append(f"left {', '.join(leftovers)}")
    assert not wrong, "; ".join(wrong) + "\n" + _describe(result)


def test_corpus_and_readme_agree() -> None:
    """Every file of tests/bad_inputs/ is used by one case and listed in the README with that case's
    stage and message fragment."""
    static = {c.source: c for c in CASES if c.source and (BAD / c.source).exists()}
    on_disk = {p.name for p in BAD.iterdir()} - {"README.md", ".gitattributes"}
    assert on_disk == set(static), on_disk ^ set(static)
    readme = (BAD / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| ([\w-]+) \| .* \| `(.*)` \|$", readme, re.M)
    assert {name: (stage, fragment) for name, stage, fragment in rows} == {
        name: (c.stage, c.problem) for name, c in static.items()
    }
    assert len({c.id for c in CASES}) == len(CASES)
