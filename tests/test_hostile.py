"""Hostile inputs: text that cannot be written or printed, crafted artifact metadata, a hostile
environment and options, and inputs that would give misleading results.

Each class has a test of its cause (the one mechanism that handles it), and ``CASES`` runs one real
command per bad input through typer's CliRunner with the contract of test_bad_inputs.py: exit code
2, ONE line that names the file, option or field and says what is wrong, no traceback, no output
file. The cases are listed in tests/bad_inputs/README.md ("Hostile inputs"); their inputs are made
at test time from the valid artifacts of test_bad_inputs.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import unicodedata
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
from safetensors import SafetensorError
from typer.testing import Result

from caa.cli import app
from caa.errors import CaaError, InputError, ModelError
from caa.models.cache import gguf_directory, gguf_hash
from caa.models.loading import load_model
from caa.models.specs import config_num_layers, looks_like_path
from caa.report.summary import check_input_files
from caa.stages.vectors import VectorSet
from caa.store.artifacts import read_meta
from caa.store.checkpoint import partial_dir
from caa.store.files import WriteError, atomic_directory, atomic_path
from caa.store.schemas import ACTIVATIONS, VECTORS
from caa.store.text import MAX_JSON_DEPTH, NAME_PROBLEM, behavior_name, clean, load_json, text_problem
from tests import test_bad_inputs as corpus
from tests.helpers import FREEFORM_ROWS
from tests.test_bad_inputs import BAD, Valid, _artifact, _meta, _with, runner

valid = corpus.valid  # the valid artifacts of the bad-input corpus, a fixture here too
_one_thread = corpus._one_thread  # autouse: the tiny models run on one thread

XFF = "\udcff"  # what Python makes of the byte 0xff in argv (surrogateescape)


# --- inputs made at test time -------------------------------------------------------------------------

Maker = Callable[[Valid, Path], Path]
MAKERS: dict[str, Maker] = {}


def maker(fn: Maker) -> Maker:
    MAKERS[fn.__name__] = fn
    return fn


def _rows(*rows: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


ROW = {"prompt": "Tell me about the park.", "positive": "It was lovely.", "negative": "It was awful."}


@maker
def jsonl_lone_surrogate(v: Valid, tmp: Path) -> Path:
    path = tmp / "lone_surrogate.jsonl"
    path.write_text(_rows(ROW, {**ROW, "positive": "\ud800 lovely"}))  # json.dumps writes \ud800
    return path


@maker
def json_lone_surrogate(v: Valid, tmp: Path) -> Path:
    path = tmp / "lone_surrogate.json"
    path.write_text(json.dumps([ROW, {**ROW, "prompt": "Tell me \udfff"}]))
    return path


@maker
def json_surrogate_key(v: Valid, tmp: Path) -> Path:
    path = tmp / "surrogate_key.json"
    path.write_text(json.dumps([{**ROW, "note\ud83d": "x"}]))
    return path


@maker
def json_deep(v: Valid, tmp: Path) -> Path:
    path = tmp / "deep.json"
    path.write_text("[" * 100_000)
    return path


@maker
def jsonl_nested_500(v: Valid, tmp: Path) -> Path:
    """Parses (below the interpreter's limit), but a repr or a print of it could exhaust the stack."""
    path = tmp / "nested_500.jsonl"
    path.write_text(_rows({**ROW, "prompt": json.loads("[" * 500 + "]" * 500)}))
    return path


@maker
def jsonl_huge_int(v: Valid, tmp: Path) -> Path:
    path = tmp / "huge_int.jsonl"
    path.write_text('{"prompt": "p", "positive": 1' + "0" * 5000 + ', "negative": "n"}\n')
    return path


@maker
def csv_encoded_surrogate(v: Valid, tmp: Path) -> Path:
    path = tmp / "encoded_surrogate.csv"
    path.write_bytes(b"prompt,positive,negative\nTell me.,\xed\xa0\x80,Awful.\n")
    return path


def _not_utf8(values: list[str], bad: int) -> pa.Array:
    raw = [v.encode() for v in values]
    raw[bad] = b"\xff\xfe broken"
    return pa.array(raw, pa.binary()).view(pa.string())  # Arrow does not check the bytes


@maker
def parquet_not_utf8(v: Valid, tmp: Path) -> Path:
    path = tmp / "not_utf8.parquet"
    columns = {k: [ROW[k], ROW[k] + " again"] for k in ROW}
    table = pa.table({**columns, "positive": _not_utf8(columns["positive"], 1)})
    pq.write_table(table, path)
    return path


@maker
def prompts_lone_surrogate(v: Valid, tmp: Path) -> Path:
    path = tmp / "prompts_surrogate.jsonl"
    path.write_text(_rows({"prompt": "hello \ud800"}))
    return path


@maker
def prompts_parquet_not_utf8(v: Valid, tmp: Path) -> Path:
    path = tmp / "prompts_not_utf8.parquet"
    pq.write_table(pa.table({"prompt": _not_utf8(["hello", "there"], 0)}), path)
    return path


@maker
def neutral_lone_surrogate(v: Valid, tmp: Path) -> Path:
    path = tmp / "neutral_surrogate.jsonl"
    path.write_text(_rows({"text": "the park is nice"}, {"text": "we walk \udbff"}))
    return path


@maker
def neutral_deep(v: Valid, tmp: Path) -> Path:
    path = tmp / "neutral_deep.jsonl"
    path.write_text(_rows({"text": "the park", "meta": json.loads("[" * 200 + "]" * 200)}))
    return path


def _pairs_meta(v: Valid, tmp: Path, name: str, **changes: Any) -> Path:
    return _with(v.pairs, tmp / name, meta={**_meta(v.pairs), **changes})


@maker
def pairs_meta_inputs_list(v: Valid, tmp: Path) -> Path:
    return _pairs_meta(v, tmp, "pairs_inputs_list.parquet", inputs=["agree.jsonl"])


@maker
def pairs_meta_kind_list(v: Valid, tmp: Path) -> Path:
    return _pairs_meta(v, tmp, "pairs_kind_list.parquet", kind=["pairs"])


@maker
def pairs_meta_version_true(v: Valid, tmp: Path) -> Path:
    return _pairs_meta(v, tmp, "pairs_version_true.parquet", schema_version=True)


@maker
def pairs_meta_counts_text(v: Valid, tmp: Path) -> Path:
    return _pairs_meta(v, tmp, "pairs_counts_text.parquet", counts={"agree": {"train": "5"}})


@maker
def pairs_meta_surrogate(v: Valid, tmp: Path) -> Path:
    raw = json.dumps({**_meta(v.pairs), "created": "2024\ud800"}).encode()
    return _with(v.pairs, tmp / "pairs_meta_surrogate.parquet", raw=raw)


@maker
def pairs_meta_deep(v: Valid, tmp: Path) -> Path:
    meta = json.dumps(_meta(v.pairs))[:-1] + ', "extra": ' + "[" * 5000 + "]" * 5000 + "}"
    return _with(v.pairs, tmp / "pairs_meta_deep.parquet", raw=meta.encode())


def _acts_meta(v: Valid, tmp: Path, name: str, **changes: Any) -> Path:
    return _with(v.acts, tmp / name, meta={**_meta(v.acts), **changes})


@maker
def acts_meta_options_list(v: Valid, tmp: Path) -> Path:
    return _acts_meta(v, tmp, "acts_options_list.parquet", options=["--layers", "1,2"])


@maker
def acts_meta_layers_text(v: Valid, tmp: Path) -> Path:
    return _acts_meta(v, tmp, "acts_layers_text.parquet", layers=["1", "2"])


@maker
def acts_meta_model_list(v: Valid, tmp: Path) -> Path:
    return _acts_meta(v, tmp, "acts_model_list.parquet", model=["tiny"])


def _vectors_meta(v: Valid, tmp: Path, name: str, **changes: Any) -> Path:
    return _with(v.vectors, tmp / name, meta={**_meta(v.vectors), **changes})


@maker
def vectors_meta_prompt_text(v: Valid, tmp: Path) -> Path:
    return _vectors_meta(v, tmp, "vectors_prompt_text.parquet", prompt="chat")


@maker
def vectors_meta_train_ids_number(v: Valid, tmp: Path) -> Path:
    return _vectors_meta(v, tmp, "vectors_train_ids_number.parquet", train_pair_ids=7)


@maker
def vectors_meta_hidden_size_text(v: Valid, tmp: Path) -> Path:
    model = {**_meta(v.vectors)["model"], "hidden_size": "32"}
    return _vectors_meta(v, tmp, "vectors_hidden_size_text.parquet", model=model)


@maker
def vectors_meta_input_hash_number(v: Valid, tmp: Path) -> Path:
    return _vectors_meta(v, tmp, "vectors_input_hash_number.parquet", inputs={"acts.parquet": 5})


@maker
def sweep_meta_recommended_short(v: Valid, tmp: Path) -> Path:
    """A sweep file whose recommendation lacks the multiplier (inspect reads its metadata first)."""
    meta = {**_meta(v.vectors), "kind": "sweep", "command": "caa sweep", "recommended": {"mood": [1]}}
    return _with(v.vectors, tmp / "sweep_recommended_short.parquet", meta=meta)


def _model_dir(v: Valid, tmp: Path, name: str, config: str | None = None, weights: bool = True) -> Path:
    """A copy of the tiny llama's directory (its weights left out unless ``weights``), with
    config.json replaced by ``config`` if given."""
    path = tmp / name
    path.mkdir()
    for f in v.model.iterdir():
        if weights or not f.name.endswith(".safetensors"):
            (path / f.name).write_bytes(f.read_bytes())
    if config is not None:
        (path / "config.json").write_text(config)
    return path


@maker
def model_config_list(v: Valid, tmp: Path) -> Path:
    return _model_dir(v, tmp, "model_config_list", "[1, 2]")


@maker
def model_type_number(v: Valid, tmp: Path) -> Path:
    config = {**json.loads((v.model / "config.json").read_text()), "model_type": 5}
    return _model_dir(v, tmp, "model_type_number", json.dumps(config))


@maker
def model_without_weights(v: Valid, tmp: Path) -> Path:
    """The tiny llama's config and tokenizer without weights: loading it fails, so a check that
    fails first ran before the model loaded."""
    return _model_dir(v, tmp, "model_without_weights", weights=False)


@maker
def model_weights_cut_short(v: Valid, tmp: Path) -> Path:
    """The tiny llama with its model.safetensors cut off after 100 bytes (an interrupted download)."""
    path = _model_dir(v, tmp, "model_weights_cut_short")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return path


@maker
def cache_is_a_file(v: Valid, tmp: Path) -> Path:
    path = tmp / "cache_file"
    path.write_text("not a directory")
    return path


@maker
def vectors_duplicate_rows(v: Valid, tmp: Path) -> Path:
    table = pq.read_table(v.vectors)
    return _with(v.vectors, tmp / "vectors_duplicate_rows.parquet", pa.concat_tables([table, table]))


def _with_split(v: Valid, tmp: Path, name: str, train: int) -> Path:
    """The mood activations, with only the first ``train`` pairs in the train split."""
    table = pq.read_table(v.acts)
    table = table.filter(pc.equal(table["behavior"], "mood"))
    ids = table["pair_id"].to_pylist()
    keep = set(list(dict.fromkeys(ids))[:train])
    split = pa.array(["train" if i in keep else "test" for i in ids]).dictionary_encode()
    index = table.column_names.index("split")
    table = table.set_column(index, "split", split.cast(pa.dictionary(pa.int8(), pa.string())))
    return _with(v.acts, tmp / name, table)


@maker
def acts_one_training_pair(v: Valid, tmp: Path) -> Path:
    return _with_split(v, tmp, "acts_one_training_pair.parquet", 1)


@maker
def acts_equal_differences(v: Valid, tmp: Path) -> Path:
    """Every pair's positive - negative is the same vector: no principal component."""

    def edit(c: dict[str, Any]) -> None:
        for i, side in enumerate(c["side"]):
            c["activation"][i] = np.full(c["activation"].shape[1], 2.0 if side == "positive" else 1.0)

    return _artifact(v.acts, tmp / "acts_equal_differences.parquet", ACTIVATIONS, edit)


def _pairs_edit(v: Valid, tmp: Path, name: str, column: str, row: int, value: str) -> Path:
    table = pq.read_table(v.pairs)
    values = table[column].to_pylist()
    values[row] = value
    index = table.column_names.index(column)
    return _with(v.pairs, tmp / name, table.set_column(index, column, pa.array(values, pa.string())))


def _first(v: Valid, fmt: str) -> int:
    return pq.read_table(v.pairs)["format"].to_pylist().index(fmt)


@maker
def pairs_empty_positive(v: Valid, tmp: Path) -> Path:
    return _pairs_edit(v, tmp, "pairs_empty_positive.parquet", "positive", _first(v, "freeform"), "")


@maker
def pairs_ab_answer_word(v: Valid, tmp: Path) -> Path:
    return _pairs_edit(v, tmp, "pairs_ab_answer_word.parquet", "negative", _first(v, "ab"), "No")


@maker
def pairs_blank_negative(v: Valid, tmp: Path) -> Path:
    return _pairs_edit(v, tmp, "pairs_blank_negative.parquet", "negative", _first(v, "freeform"), "  ")


# --- the cases ----------------------------------------------------------------------------------------

GENERATE = "generate -v {vectors} -m {model} --layer 1 --behavior mood -p hello --max-new-tokens 2"
SWEEP = "sweep {vectors} {pairs} -m {model} --neutral {neutral} --multipliers -1,1"


@dataclass(frozen=True)
class Case:
    """One hostile input through one command: ``line`` (``{bad}`` is the made input, ``{xff}`` the
    byte 0xff as argv gives it; ``-o {out}`` is appended unless ``out`` is False), the message
    fragment ``problem``, and what the message must name (default: the made input's file name)."""

    id: str
    line: str
    problem: str
    make: str | None = None
    names: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    out: bool = True


CASES = [
    # untrusted text: one JSON reader and one text check for files and arguments
    Case(
        "ingest-jsonl-lone-surrogate",
        "ingest {bad}",
        "line 2: field 'positive': not valid Unicode: a lone surrogate U+D800",
        "jsonl_lone_surrogate",
    ),
    Case(
        "ingest-json-lone-surrogate",
        "ingest {bad}",
        "index 1: field 'prompt': not valid Unicode: a lone surrogate U+DFFF",
        "json_lone_surrogate",
    ),
    Case(
        "ingest-json-surrogate-key",
        "ingest {bad}",
        "index 0: a key is not valid Unicode",
        "json_surrogate_key",
    ),
    Case(
        "ingest-json-100k-brackets", "ingest {bad}", "malformed JSON: nested more than 64 levels", "json_deep"
    ),
    Case(
        "ingest-jsonl-nested-500",
        "ingest {bad}",
        "line 1: field 'prompt': nested more than 64 levels deep",
        "jsonl_nested_500",
    ),
    Case(
        "ingest-jsonl-5000-digits",
        "ingest {bad}",
        "line 1: malformed JSON: an integer of 5001 digits",
        "jsonl_huge_int",
    ),
    Case(
        "ingest-csv-encoded-surrogate",
        "ingest {bad}",
        "line 2: not valid UTF-8 (byte 0xed)",
        "csv_encoded_surrogate",
    ),
    Case(
        "ingest-parquet-not-utf8",
        "ingest {bad}",
        "row 1: field 'positive': not valid UTF-8",
        "parquet_not_utf8",
    ),
    Case(
        "ingest-behavior-not-utf8",
        "ingest {source} --behavior {xff}",
        "--behavior: not valid UTF-8 (byte 0xff",
        names="--behavior",
    ),
    Case(
        "ingest-map-not-utf8",
        "ingest {source} --map=positive={xff}",
        "--map: not valid UTF-8 (byte 0xff",
        names="--map",
    ),
    Case(
        "ingest-file-name-not-utf8",
        "ingest {root}/mood{xff}.jsonl",
        "not valid UTF-8 (byte 0xff at character",
        names="argument",
    ),
    Case(
        "extract-behavior-not-utf8",
        "extract {pairs} -m {model} --behavior={xff}",
        "--behavior: not valid UTF-8",
        names="--behavior",
    ),
    Case("generate-prompt-not-utf8", GENERATE + " -p {xff}", "-p: not valid UTF-8 (byte 0xff", names="-p"),
    Case(
        "generate-prompts-lone-surrogate",
        GENERATE + " --prompts {bad}",
        "line 1: field 'prompt': not valid Unicode",
        "prompts_lone_surrogate",
    ),
    Case(
        "generate-prompts-parquet-not-utf8",
        GENERATE + " --prompts {bad}",
        "row 0: field 'prompt': not valid UTF-8",
        "prompts_parquet_not_utf8",
    ),
    Case(
        "sweep-neutral-lone-surrogate",
        SWEEP.replace("{neutral}", "{bad}"),
        "line 2: field 'text': not valid Unicode",
        "neutral_lone_surrogate",
    ),
    Case(
        "sweep-neutral-nested-200", SWEEP.replace("{neutral}", "{bad}"), "nested more than 64", "neutral_deep"
    ),
    # crafted artifact metadata: the schema declared in caa.schemas, checked by read_meta
    Case(
        "extract-meta-inputs-list",
        "extract {bad} -m {model}",
        "field 'inputs': expected an object",
        "pairs_meta_inputs_list",
    ),
    Case(
        "extract-meta-kind-list",
        "extract {bad} -m {model}",
        "field 'kind': expected a string",
        "pairs_meta_kind_list",
    ),
    Case(
        "extract-meta-version-true",
        "extract {bad} -m {model}",
        "field 'schema_version': expected an integer",
        "pairs_meta_version_true",
    ),
    Case(
        "extract-meta-counts-text",
        "extract {bad} -m {model}",
        "field 'counts.agree.train': expected an integer",
        "pairs_meta_counts_text",
    ),
    Case(
        "extract-meta-lone-surrogate",
        "extract {bad} -m {model}",
        "field 'caa.created': not valid Unicode",
        "pairs_meta_surrogate",
    ),
    Case("extract-meta-nested-5000", "extract {bad} -m {model}", "nested more than 64", "pairs_meta_deep"),
    Case(
        "compute-vectors-meta-options-list",
        "compute-vectors {bad}",
        "field 'options': expected an object",
        "acts_meta_options_list",
    ),
    Case(
        "compute-vectors-meta-layers-text",
        "compute-vectors {bad}",
        "field 'layers[0]': expected an integer",
        "acts_meta_layers_text",
    ),
    Case(
        "compute-vectors-meta-model-list",
        "compute-vectors {bad}",
        "field 'model': expected an object",
        "acts_meta_model_list",
    ),
    Case(
        "sweep-meta-prompt-text",
        SWEEP.replace("{vectors}", "{bad}"),
        "field 'prompt': expected an object or null",
        "vectors_meta_prompt_text",
    ),
    Case(
        "sweep-meta-train-ids-number",
        SWEEP.replace("{vectors}", "{bad}"),
        "field 'train_pair_ids': expected a list of strings",
        "vectors_meta_train_ids_number",
    ),
    Case(
        "generate-meta-hidden-size-text",
        GENERATE.replace("{vectors}", "{bad}"),
        "field 'model.hidden_size': expected an integer",
        "vectors_meta_hidden_size_text",
    ),
    Case(
        "inspect-meta-input-hash-number",
        "inspect {bad}",
        "field 'inputs.acts.parquet': expected a string",
        "vectors_meta_input_hash_number",
        out=False,
    ),
    Case(
        "inspect-meta-recommended-short",
        "inspect {bad}",
        "field 'recommended.mood': expected a list of 2 values",
        "sweep_meta_recommended_short",
        out=False,
    ),
    # environment and options
    Case(
        "extract-config-not-object",
        "extract {pairs} -m {bad}",
        "config.json: is not a model config: expected a JSON object, found a JSON array",
        "model_config_list",
    ),
    Case(
        "extract-config-type-number",
        "extract {pairs} -m {bad}",
        "field 'model_type': expected a string",
        "model_type_number",
    ),
    Case(
        "extract-cache-is-a-file",
        f"extract {{pairs}} -m {BAD / 'model_garbage.gguf'}",
        "(CAA_CACHE): is a file, not a directory",
        "cache_is_a_file",
        env=(("CAA_CACHE", "{bad}"),),
    ),
    Case(
        "generate-temperature-1e-300",
        GENERATE + " --temperature 1e-300",
        "--temperature 1e-300: must be 0",
        names="--temperature",
    ),
    Case(
        "generate-temperature-inf",
        GENERATE + " --temperature inf",
        "--temperature inf: must be 0",
        names="--temperature",
    ),
    Case(
        "generate-seed-negative",
        GENERATE + " --temperature 1 --seed=-1",
        "--seed -1: must be at least 0",
        names="--seed",
    ),
    Case("generate-seed-2-63", GENERATE + f" --temperature 1 --seed {2**63}", "below 2**63", names="--seed"),
    Case(
        "ingest-seed-negative", "ingest {source} --seed=-5", "--seed -5: must be at least 0", names="--seed"
    ),
    Case("ingest-seed-2-64", f"ingest {{source}} --seed {2**64}", "below 2**63", names="--seed"),
    Case(
        "extract-model-path-typo",
        "extract {pairs} -m ./models/tiny",
        "no such model directory or file: './models/tiny'",
        names="./models/tiny",
    ),
    Case(
        "extract-model-hub-offline",
        "extract {pairs} -m nobody/not-cached",
        "the hub is offline (HF_HUB_OFFLINE is set)",
        names="nobody/not-cached",
        env=(("HF_HUB_OFFLINE", "1"),),
    ),
    Case(
        "extract-position-unknown",
        "extract {pairs} -m {bad} --position first",
        "--position 'first'",
        "model_without_weights",
        "--position",
    ),
    Case(
        "extract-layers-before-load",
        "extract {pairs} -m {bad} --layers 2-7",
        "layer 4 is out of range; valid layers are 0-3",
        "model_without_weights",
        "--layers",
    ),
    Case(
        "sweep-layers-before-load",
        SWEEP.replace("{model}", "{bad}") + " --layers 9",
        "layer 9 is out of range",
        "model_without_weights",
        "--layers",
    ),
    # misleading results
    Case(
        "sweep-duplicate-vectors",
        SWEEP.replace("{vectors}", "{bad}"),
        "field 'layer': a second vector of",
        "vectors_duplicate_rows",
    ),
    Case(
        "generate-duplicate-vectors",
        GENERATE.replace("{vectors}", "{bad}"),
        "field 'layer': a second vector of 'agree' at layer 1",
        "vectors_duplicate_rows",
    ),
    Case(
        "compute-vectors-pca-one-pair",
        "compute-vectors {bad} --method pca",
        "--method pca: 'mood' has 1 training pair",
        "acts_one_training_pair",
    ),
    Case(
        "compute-vectors-pca-equal-differences",
        "compute-vectors {bad} --method pca",
        "the training differences are all equal",
        "acts_equal_differences",
    ),
    Case(
        "extract-pairs-empty-positive",
        "extract {bad} -m {model}",
        "field 'positive': empty text",
        "pairs_empty_positive",
    ),
    Case(
        "sweep-pairs-blank-negative",
        SWEEP.replace("{pairs}", "{bad}"),
        "field 'negative': empty text",
        "pairs_blank_negative",
    ),
    Case(
        "extract-pairs-ab-answer-word",
        "extract {bad} -m {model}",
        "field 'negative': 'No' is not an A/B answer",
        "pairs_ab_answer_word",
    ),
    Case(
        "ingest-pairs-with-behavior",
        "ingest {pairs} --behavior other",
        "is a caa pairs file",
        names="--behavior",
    ),
    Case("ingest-vectors-file", "ingest {vectors}", "expected a 'pairs' file", names="vectors.parquet"),
    Case(
        "extract-model-weights-cut-short",
        "extract {pairs} -m {bad}",
        "not a readable safetensors file",
        "model_weights_cut_short",
        names="model_weights_cut_short/model.safetensors",
    ),
    Case(
        "generate-layer-before-load",
        GENERATE.replace("{model}", "./no/such/model") + " --layer 3",
        "no vector for 'mood' at layer 3",
        names="vectors.parquet",
    ),
    Case(
        "generate-behavior-before-load",
        GENERATE.replace("{model}", "./no/such/model") + " --behavior nosuch",
        "no behavior 'nosuch'",
        names="vectors.parquet",
    ),
]


def _describe(result: Result) -> str:
    lines = [f"exit code {result.exit_code}", "output:", result.output[-3000:]]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        lines += ["exception:", "".join(traceback.format_exception(*result.exc_info))[-3000:]]
    return "\n".join(lines)


def run_case(case: Case, valid: Valid, tmp: Path) -> tuple[Result, Path, str]:
    subs = {**valid.subs(), "out": str(tmp / "out.parquet"), "xff": XFF}
    if case.make:
        subs["bad"] = str(MAKERS[case.make](valid, tmp))
    args = [part.format(**subs) for part in shlex.split(case.line)]
    if case.out:
        args += ["-o", subs["out"]]
    env = {k: v.format(**subs) for k, v in case.env}
    named = case.names or Path(subs["bad"]).name
    return runner.invoke(app, args, env=env), tmp / "out.parquet", named


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, valid: Valid, tmp_path: Path) -> None:
    result, _, named = run_case(case, valid, tmp_path)
    wrong = []
    if result.exit_code != 2:
        wrong.append(f"exit code {result.exit_code}, expected 2")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        wrong.append(f"raised {type(result.exception).__name__}")
    if case.problem not in result.output:
        wrong.append(f"the message lacks {case.problem!r}")
    if named not in result.output:
        wrong.append(f"the message does not name {named!r}")
    lines = result.output.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: "):
        wrong.append(f"{len(lines)} lines of output, expected one error line")
    leftovers = sorted(p.name for p in tmp_path.iterdir() if "out." in p.name)
    if leftovers:
        wrong.append(f"left {', '.join(leftovers)}")
    assert not wrong, "; ".join(wrong) + "\n" + _describe(result)


def test_readme_lists_the_cases() -> None:
    """The "Hostile inputs" section of tests/bad_inputs/README.md lists every case, and only those."""
    readme = (BAD / "README.md").read_text()
    section = readme.split("## Hostile inputs", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| ([a-z0-9-]+) \| ", section, re.M)[1:]  # after the header
    assert listed == [c.id for c in CASES]
    assert len(set(listed)) == len(listed)


# --- untrusted text: the causes ----------------------------------------------------------------------


def test_text_problem_names_bytes_and_surrogates() -> None:
    assert text_problem("plain") is None
    assert text_problem("café ☕ 🙂") is None  # real non-ASCII text is fine
    assert text_problem("a" + XFF) == "not valid UTF-8 (byte 0xff at character 2)"
    assert text_problem("\ud800") == "not valid Unicode: a lone surrogate U+D800 at character 1"


def test_load_json_refuses_what_cannot_be_written_again() -> None:
    """Whatever load_json returns survives json.dumps(ensure_ascii=False), UTF-8 encoding, repr
    and a recursive walk: the ways caa writes, prints and hashes text."""
    docs = [
        '["\\ud800"]',
        '{"\\udfff": 1}',
        "[" * 50_000,
        "[" * 200 + "]" * 200,
        "1" * 5000,
        '{"a": "\\ud83d\\ude00"}',
    ]
    accepted = []
    for doc in docs:
        try:
            accepted.append(load_json(doc, "f.json"))
        except InputError as e:
            assert str(e).startswith("f.json: ") and "\n" not in str(e)
    assert accepted == [{"a": "😀"}]  # a surrogate *pair* is an ordinary character
    for value in accepted:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        repr(value)


def test_load_json_places_the_problem() -> None:
    with pytest.raises(InputError, match=r"^f\.json: index 2: field 'b\[1\]': not valid Unicode"):
        load_json('[{}, {}, {"b": ["ok", "\\ud800"]}]', "f.json", rows=True)
    with pytest.raises(InputError, match=r"^f\.jsonl: line 7: field 'caa\.x': not valid Unicode"):
        load_json('{"x": "\\udc00"}', "f.jsonl", where="line 7", field="caa")
    depth = MAX_JSON_DEPTH + 1
    with pytest.raises(InputError, match="nested more than"):
        load_json("[" * depth + "]" * depth, "f.json")
    load_json("[" * (depth - 1) + "]" * (depth - 1), "f.json")


def test_every_argument_is_checked_before_any_command() -> None:
    """The command group checks argv itself: any command, any option, and positional files."""
    for args, named in (
        (["ingest", "x.jsonl", "--behavior", XFF], "--behavior"),
        (["compute-vectors", "acts" + XFF + ".parquet"], "argument 'acts\\udcff.parquet'"),
        (["inspect", "--no-check-inputs", XFF], "argument"),
        (["extract", "p.parquet", "--model=" + XFF], "--model"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: {named}") and "not valid UTF-8" in result.output


# --- terminal output ---------------------------------------------------------------------------------


def test_clean_shows_control_characters() -> None:
    hostile = "a\x1b[2J\x1b]0;title\x07b\rc\x9bd\u202ee\udcff\nf\tg"
    shown = clean(hostile)
    assert shown == "a\\x1b[2J\\x1b]0;title\\x07b\\rc\\x9bd\\u202ee\\udcff\\nf\\tg"
    assert clean(hostile, keep="\n").count("\n") == 1
    assert shown.isprintable() and clean(shown) == shown  # idempotent


def test_data_reaches_the_terminal_escaped(tmp_path: Path) -> None:
    """An error message and a table cell built from a dataset, through the CLI."""
    src = tmp_path / "ansi.json"
    question = "Pick one.\n\nChoices:\n (A) Yes\n (B) No"
    row = {
        "question": question,
        "answer_matching_behavior": "\x1b]0;pwned\x07(A",
        "answer_not_matching_behavior": "(B)",
    }
    src.write_text(json.dumps([row]))
    result = runner.invoke(app, ["ingest", str(src), "-o", str(tmp_path / "p.parquet")])
    assert result.exit_code == 2
    assert (
        "\x1b" not in result.output and "\x07" not in result.output and "\\x1b]0;pwned\\x07" in result.output
    )
    assert len(result.output.strip().splitlines()) == 1
    jsonl = tmp_path / "mood.jsonl"
    jsonl.write_text(_rows(ROW))
    behavior = "\x1b[31mred[/]\r"
    result = runner.invoke(
        app, ["ingest", str(jsonl), "--behavior", behavior, "-o", str(tmp_path / "p.parquet")]
    )
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\r" not in result.output
    assert "\\x1b[31mred[/]\\r" in result.output


def test_version() -> None:
    from caa import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"caa {__version__}"


# --- crafted metadata --------------------------------------------------------------------------------


def test_valid_artifacts_pass_the_metadata_schema(valid: Valid) -> None:
    for path in (valid.pairs, valid.acts, valid.vectors, valid.other_acts, valid.other_vectors):
        assert read_meta(path) == _meta(path)


def test_inspect_hashes_only_regular_files(valid: Valid, tmp_path: Path) -> None:
    """Paths in `inputs` are the artifact's word: a fifo, a device or a /proc file is never read
    (or read past its size), and a crafted file makes inspect report, not hang."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    regular = tmp_path / "regular.txt"
    regular.write_bytes(b"hello")
    recorded = {
        str(fifo): "0" * 64,
        "/dev/zero": "0" * 64,
        str(tmp_path): "0" * 64,
        "/proc/self/status": "0" * 64,
        str(regular): hashlib.sha256(b"hello").hexdigest(),
        str(tmp_path / "gone"): "0" * 64,
    }
    found: list[Any] = []
    worker = threading.Thread(target=lambda: found.extend(check_input_files(recorded)), daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "check_input_files blocked"
    status = {c.path: (c.status, c.current_sha256) for c in found}
    assert status[str(fifo)] == ("special", None)
    assert status["/dev/zero"] == ("special", None)
    assert status[str(tmp_path)] == ("special", None)
    assert status["/proc/self/status"] == ("changed", hashlib.sha256(b"").hexdigest())  # size 0: nothing read
    assert status[str(regular)][0] == "unchanged"
    assert status[str(tmp_path / "gone")] == ("missing", None)
    crafted = _with(valid.vectors, tmp_path / "v.parquet", meta={**_meta(valid.vectors), "inputs": recorded})
    result = runner.invoke(app, ["inspect", str(crafted)])
    assert result.exit_code == 0, result.output
    assert "not a regular file" in result.output


# --- environment and options -------------------------------------------------------------------------


def test_model_specs_that_look_like_paths_fail_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in ("./models/tiny", "/no/such/dir", "~/models/tiny", "a/b/c", "org/model.safetensors"):
        assert looks_like_path(spec)
        start = time.monotonic()
        with pytest.raises(ModelError, match=f"no such model directory or file: '{re.escape(spec)}'"):
            load_model(spec, device="cpu")
        assert time.monotonic() - start < 5
    for spec in ("HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.1-8B"):
        assert not looks_like_path(spec)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelError, match="the hub is offline"):
        load_model("nobody/not-cached-anywhere", device="cpu")
    assert time.monotonic() - start < 5


def test_layer_count_from_the_config_without_loading(valid: Valid, tmp_path: Path) -> None:
    assert config_num_layers(str(valid.model)) == 4
    assert config_num_layers(str(MAKERS["model_without_weights"](valid, tmp_path))) == 4
    assert config_num_layers("./no/such/model") is None
    assert config_num_layers("nobody/not-cached") is None
    assert config_num_layers(str(BAD / "model_bad_config")) is None  # loading reports it


def test_config_that_is_not_an_object_is_one_error(valid: Valid, tmp_path: Path) -> None:
    path = MAKERS["model_config_list"](valid, tmp_path)
    with pytest.raises(CaaError, match=r"config\.json: is not a model config"):
        load_model(str(path), device="cpu")


# --- misleading results ------------------------------------------------------------------------------


def test_reingesting_pairs_keeps_behaviors_ids_and_splits(valid: Valid, tmp_path: Path) -> None:
    """`caa ingest pairs.parquet more.jsonl` adds to the pairs; the old ones keep everything,
    whatever --test-fraction and --seed say now."""
    more = tmp_path / "extra.jsonl"
    more.write_text(_rows({**ROW, "prompt": "Tell me about the sea."}))
    out = tmp_path / "again.parquet"
    args = ["ingest", str(valid.pairs), str(more), "-o", str(out), "--test-fraction", "0.9", "--seed", "7"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    columns = [
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
    before = pq.read_table(valid.pairs).to_pandas()[columns].astype(str)
    after = pq.read_table(out).to_pandas()[columns].astype(str)
    assert after.iloc[: len(before)].reset_index(drop=True).equals(before)
    assert set(after.behavior) == {"agree", "mood", "extra"}
    assert len(after) == len(before) + 1
    # and again: nothing changes, the repeated pairs are dropped as duplicates
    result = runner.invoke(app, ["ingest", str(out), str(valid.pairs), "-o", str(tmp_path / "third.parquet")])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "third.parquet").to_pandas()[columns].astype(str).equals(after)


def test_absurd_norms_are_warned_about(valid: Valid, tmp_path: Path) -> None:
    table = pq.read_table(valid.vectors)
    residual = table["mean_residual_norm"].to_pylist()
    norms = table["vector_norm"].to_pylist()
    big = next(i for i, b in enumerate(table["behavior"].to_pylist()) if b == "mood")
    scale = 1000 * residual[big] / norms[big]

    def edit(c: dict[str, Any]) -> None:
        c["vector"][big] *= scale

    path = _artifact(valid.vectors, tmp_path / "vectors_huge.parquet", VECTORS, edit)
    vecs = VectorSet.read(path)
    warnings = vecs.absurd_norms()
    assert len(warnings) == 1 and "1e+03 times the layer's mean residual norm" in warnings[0]
    assert vecs.absurd_norms(["agree"]) == []
    assert VectorSet.read(valid.vectors).absurd_norms() == []
    layer = table["layer"][big].as_py()
    out = tmp_path / "gen.parquet"
    args = ["generate", "-v", str(path), "-m", str(valid.model), "--layer", str(layer), "--behavior", "mood"]
    result = runner.invoke(app, [*args, "-p", "hello", "--max-new-tokens", "2", "-o", str(out)])
    assert result.exit_code == 0, _describe(result)
    assert result.output.count("warning:") == 1 and "times the layer's mean residual norm" in result.output


# --- behavior names: one spelling (NFC), something visible, drawn as written -------------------------

CAFE_NFC, CAFE_NFD = "caf\u00e9", "cafe\u0301"  # print alike; macOS keeps file names as the second


def _renamed(src: Path, dst: Path, names: dict[str, str]) -> Path:
    """``src`` with its behaviors renamed, bypassing every check (a file written elsewhere, or by a caa
    that kept names as they came)."""
    table = pq.read_table(src)
    renamed = [names.get(b, b) for b in table.column("behavior").to_pylist()]
    index = table.column_names.index("behavior")
    return _with(src, dst, table.set_column(index, table.field(index), pa.array(renamed, pa.string())))


def test_behavior_names_are_kept_in_nfc_and_must_show_something() -> None:
    """The one check (caa.stages.options.check_behavior, caa.store.text.behavior_name): NFC, and an
    empty name and one of only spaces or invisible characters are refused alike."""
    import caa

    assert behavior_name(CAFE_NFD) == behavior_name(CAFE_NFC) == CAFE_NFC
    assert caa.IngestOptions(behavior=CAFE_NFD).behavior == CAFE_NFC
    assert caa.ExtractOptions(behaviors=[CAFE_NFD]).behaviors == (CAFE_NFC,)
    assert caa.SweepOptions(behaviors=[CAFE_NFD, "agree"]).behaviors == (CAFE_NFC, "agree")
    assert caa.GenerateOptions(layer=1, behavior=CAFE_NFD).behavior == CAFE_NFC
    problems = set()
    for name in ["", "  ", "\u200b", "\ufeff", "\u2060\u00a0", "\u3164", "\u0301"]:
        assert behavior_name(name) is None, repr(name)
        with pytest.raises(caa.OptionError) as e:
            caa.IngestOptions(behavior=name)
        problems.add(e.value.problem)
        with pytest.raises(caa.OptionError, match="behaviors="):
            caa.SweepOptions(behaviors=["agree", name])
        with pytest.raises(caa.OptionError, match="behavior="):
            caa.GenerateOptions(layer=1, behavior=name)
    assert problems == {NAME_PROBLEM}
    for name in ["a", "é", "$", "ca\u200bfé", "日本"]:
        assert behavior_name(name) == unicodedata.normalize("NFC", name)


def test_nfc_and_nfd_file_names_are_one_behavior(valid: Valid, tmp_path: Path) -> None:
    files = [shutil.copy(valid.source, tmp_path / f"{name}.jsonl") for name in (CAFE_NFD, CAFE_NFC)]
    out = tmp_path / "pairs.parquet"
    result = runner.invoke(app, ["ingest", *map(str, files), "-o", str(out)])
    assert result.exit_code == 0, _describe(result)
    frame = pq.read_table(out).to_pandas()
    assert set(frame.behavior) == {CAFE_NFC}
    assert result.output.count("exact duplicate") == len(frame)  # the same pairs: the second file's dropped


def test_a_rows_behavior_field_is_kept_in_nfc_and_checked() -> None:
    import caa

    pairs = caa.ingest([{**row, "behavior": CAFE_NFD} for row in FREEFORM_ROWS])
    assert pairs.behaviors() == [CAFE_NFC]
    with pytest.raises(InputError, match=re.escape(f"records: index 1: field 'behavior': {NAME_PROBLEM}")):
        caa.ingest([FREEFORM_ROWS[0], {**FREEFORM_ROWS[1], "behavior": "\u200b"}])


def test_a_behavior_stored_nfd_is_found_by_either_spelling(valid: Valid, tmp_path: Path) -> None:
    """Artifacts are read with their names in NFC; every lookup (--behavior of extract, sweep,
    generate and export; VectorSet.pick) takes either spelling."""
    vectors = _renamed(valid.vectors, tmp_path / "vectors_nfd.parquet", {"mood": CAFE_NFD})
    pairs = _renamed(valid.pairs, tmp_path / "pairs_nfd.parquet", {"mood": CAFE_NFD})
    vecs = VectorSet.read(vectors)
    assert vecs.behaviors() == ["agree", CAFE_NFC]
    assert vecs.pick(CAFE_NFD) == vecs.pick(CAFE_NFC) == CAFE_NFC
    assert vecs.layers(CAFE_NFD) == [1, 2] and vecs.tensor(CAFE_NFD, 1).shape == (32,)
    common = ["-m", str(valid.model)]
    commands = {
        "acts.parquet": ["extract", str(pairs), *common, "--layers", "1", "--behavior", CAFE_NFC],
        "gen.parquet": ["generate", "-v", str(vectors), *common, "--layer", "1", "--behavior", CAFE_NFC,
                        "-p", "hello", "--max-new-tokens", "2"],
        "mood.npz": ["export", str(vectors), "--behavior", CAFE_NFC],
        "sweep.parquet": ["sweep", str(vectors), str(pairs), *common, "--neutral", str(valid.neutral),
                          "--multipliers", "1", "--layers", "1", "--max-pairs", "1", "--behavior", CAFE_NFC],
    }  # fmt: skip
    for out, args in commands.items():
        result = runner.invoke(app, [*args, "-o", str(tmp_path / out)])
        assert result.exit_code == 0, _describe(result)
    assert set(pq.read_table(tmp_path / "sweep.parquet").column("behavior").to_pylist()) == {CAFE_NFC}


def test_dollars_in_a_behavior_name_are_drawn_as_written(valid: Valid, tmp_path: Path) -> None:
    """`greed$$` once crashed the sweep's plot with a mathtext error, after all the work."""
    names = {"mood": "greed$$", "agree": "cost $5 vs $6"}
    vectors = _renamed(valid.vectors, tmp_path / "vectors.parquet", names)
    pairs = _renamed(valid.pairs, tmp_path / "pairs.parquet", names)
    out = tmp_path / "sweep.parquet"
    args = ["sweep", str(vectors), str(pairs), "-m", str(valid.model), "--neutral", str(valid.neutral),
            "--multipliers", "1", "--layers", "1", "--max-pairs", "1", "-o", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, _describe(result)
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


# --- a hostile machine: SIGTERM, a full disk, names too long, places that cannot be written ---------

REPO = Path(__file__).parents[1]


def _one_error(result: Result, *fragments: str, after_work: bool = False) -> None:
    """Exit code 2 and one error line holding every fragment (``after_work``: the last line, after
    the progress bars), no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, _describe(result)
    assert len(lines) == 1 or after_work, _describe(result)
    assert lines[-1].startswith("error: "), _describe(result)
    assert not (result.exception and not isinstance(result.exception, SystemExit)), _describe(result)
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert " ".join(fragment.split()) in text, f"{fragment!r} missing\n" + _describe(result)


def _temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp"))


@contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Every file this process writes stops at ``size`` bytes (``ulimit -f``): a write past it fails
    with EFBIG, as one on a full disk fails with ENOSPC (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """``read_only(dir)``: ``dir`` made (if need be) and unwritable to this process: mode 0555, and, for
    root (whom modes do not stop), the immutable attribute; skipped where neither works."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        made.append(path)
        if os.access(path, os.W_OK):
            subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if os.access(path, os.W_OK):
            pytest.skip("no way to make a directory read-only here (root, no chattr)")
        return path

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(0o755)


# Every command, with -o into {out}; a model that does not exist ({tmp}/no-model) shows that the output
# is refused before any work (else the model would be the error).
NO_MODEL_COMMANDS = {
    "ingest": "ingest {source}",
    "extract": "extract {pairs} -m {tmp}/no-model",
    "compute-vectors": "compute-vectors {acts}",
    "sweep": "sweep {vectors} {pairs} -m {tmp}/no-model --neutral {neutral}",
    "generate": "generate -v {vectors} -m {tmp}/no-model --layer 1 --behavior mood -p hello",
    "report": "report {vectors}",
    "export": "export {vectors} --behavior mood --format npz",
    "import": "import {tmp}/v.npy --layer 1 -m {tmp}/no-model",
}


def _line(command: str, valid: Valid, tmp: Path, out: Path) -> list[str]:
    subs = {**valid.subs(), "tmp": str(tmp)}
    return [part.format(**subs) for part in shlex.split(command)] + ["-o", str(out)]


@pytest.mark.parametrize("command", NO_MODEL_COMMANDS)
def test_an_unwritable_output_directory_is_refused_before_any_work(
    command: str, valid: Valid, tmp_path: Path, read_only: Callable[[Path], Path]
) -> None:
    """`caa sweep -o ro/s.parquet` used to run the whole grid, then fail to write."""
    ro = read_only(tmp_path / "ro")
    for out in (ro / "out.parquet", ro / "new" / "out.parquet"):  # in it, or in a directory to be made there
        result = runner.invoke(app, _line(NO_MODEL_COMMANDS[command], valid, tmp_path, out))
        _one_error(result, f"the directory {ro} is not writable")


def test_a_read_only_partial_directory_is_one_error(
    valid: Valid, tmp_path: Path, read_only: Callable[[Path], Path]
) -> None:
    """The output's directory is writable but extract's OUT.partial/ (left by a run) is not."""
    out = tmp_path / "acts.parquet"
    read_only(partial_dir(out))
    result = runner.invoke(
        app, ["extract", str(valid.pairs), "-m", str(valid.model), "-o", str(out), "--resume"]
    )
    _one_error(result, f"the directory {partial_dir(out)} is not writable")


FULL_DISK_COMMANDS = {
    **{k: v for k, v in corpus.COMMANDS.items()},
    "report": "report {vectors}",
    "export-safetensors": "export {vectors} --behavior mood --format safetensors",
    "export-gguf": "export {vectors} --behavior mood --layers 1-2 --format gguf",
    "export-npy": "export {vectors} --behavior mood --layers 1 --format npy",
    "import": "import {tmp}/v.npy --layer 1 -m {model}",
}


@pytest.mark.parametrize("command", FULL_DISK_COMMANDS)
def test_a_full_disk_is_one_error_naming_the_file(command: str, valid: Valid, tmp_path: Path) -> None:
    """A write the disk refuses (here EFBIG under ``ulimit -f``; ENOSPC is the same path) is one
    line naming the output, with no output and no temporary left."""
    np.save(tmp_path / "v.npy", np.ones(32, dtype=np.float32))
    out = tmp_path / "out.data"
    args = [*_line(FULL_DISK_COMMANDS[command], valid, tmp_path, out)]
    with file_size_limit(64):
        result = runner.invoke(app, args)
    _one_error(result, "cannot write there (File too large)", str(out), after_work=True)
    assert not out.exists()
    assert _temporaries(tmp_path) == []


def test_a_full_disk_at_extracts_merge_is_one_error(valid: Valid, tmp_path: Path) -> None:
    """The pieces fit, the merged file does not: its streamed writer fails at the footer too."""
    out = tmp_path / "acts.parquet"
    args = ["extract", str(valid.pairs), "-m", str(valid.model), "-o", str(out), "--batch-size", "2"]
    with file_size_limit(50000):  # the file is 54 kB, 17 kB of it the footer
        result = runner.invoke(app, args)
    _one_error(result, f"{out}: cannot write there (File too large)", after_work=True)
    assert not out.exists() and _temporaries(tmp_path) == []


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
)
def test_a_write_the_disk_refuses_is_a_write_error(failure: Exception, tmp_path: Path) -> None:
    """ENOSPC as Python or pyarrow raise it, and as safetensors reports it, at the atomic writers."""
    target = tmp_path / "x.parquet"
    disk_full = r"cannot write there \(No space left on device\)"
    with pytest.raises(WriteError, match=r"x\.parquet: " + disk_full), atomic_path(target):
        raise failure
    with pytest.raises(WriteError, match=r"d: " + disk_full), atomic_directory(tmp_path / "d"):
        raise failure
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="not a disk's refusal"), atomic_path(target):
        raise OSError(errno.EINVAL, "not a disk's refusal")  # other failures are left as they are


def _fake_gguf(monkeypatch: pytest.MonkeyPatch, tiny: Path, tmp: Path) -> tuple[Path, str]:
    """A .gguf whose conversion transformers does by loading the tiny llama instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tmp / "fake.gguf"
    gguf.write_bytes(b"GGUF not really")
    for auto in (AutoModelForCausalLM, AutoTokenizer):
        load = auto.from_pretrained
        monkeypatch.setattr(
            auto, "from_pretrained", lambda *a, _load=load, gguf_file=None, **k: _load(tiny, **k)
        )
    return gguf, hashlib.sha256(gguf.read_bytes()).hexdigest()


def test_a_conversion_into_a_full_cache_is_one_error(
    valid: Valid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    gguf, digest = _fake_gguf(monkeypatch, valid.model, tmp_path)
    with (
        file_size_limit(4096),
        pytest.raises(ModelError, match=r"\(CAA_CACHE\): cannot write .*File too large"),
    ):
        gguf_directory(gguf, digest, None)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no half-written conversion


def test_a_read_only_cache_that_holds_the_conversion_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_only: Callable[[Path], Path]
) -> None:
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    digest = gguf_hash(gguf)
    converted = tmp_path / "cache" / "models" / digest[:32]
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    read_only(tmp_path / "cache" / "models")
    read_only(tmp_path / "cache" / "hashes")
    assert gguf_directory(gguf, gguf_hash(gguf), None) == str(converted)


def test_long_names_are_written_or_refused_before_any_work(valid: Valid, tmp_path: Path) -> None:
    """A name the filesystem takes is written (the temporary's longer name is shortened to fit); a name
    too long, the output's own or a sibling's (the sweep's STEM.items.parquet, extract's OUT.partial),
    is one error before any work."""
    longest = tmp_path / ("p" * 247 + ".parquet")  # 255 bytes
    result = runner.invoke(app, ["ingest", str(valid.source), "-o", str(longest)])
    assert result.exit_code == 0, _describe(result)
    assert read_meta(longest)["kind"] == "pairs" and _temporaries(tmp_path) == []
    cases = [
        ("ingest", tmp_path / ("p" * 300 + ".parquet"), "a file name of 308 bytes"),
        ("ingest", tmp_path / ("d" * 256) / "pairs.parquet", "a file name of 256 bytes"),
        ("sweep", tmp_path / ("s" * 242 + ".parquet"), "a file name of 256 bytes"),  # STEM.items.parquet
        ("extract", tmp_path / ("a" * 240 + ".parquet"), "a file name of 256 bytes"),  # OUT.partial
    ]
    for command, out, problem in cases:
        result = runner.invoke(app, _line(NO_MODEL_COMMANDS[command], valid, tmp_path, out))
        _one_error(result, problem, "this filesystem takes at most 255: choose a shorter name")


def test_temporaries_of_the_longest_names_fit(tmp_path: Path) -> None:
    for name in ("x" * 255, "é" * 127, "y" * 241):
        target = tmp_path / name
        with atomic_path(target) as tmp:
            assert len(os.fsencode(tmp.name)) <= 255 and tmp.name.endswith(".tmp")
            tmp.write_bytes(b"data")
        assert target.read_bytes() == b"data"
        with atomic_directory(tmp_path / f"{name[:-1]}d") as tmp:
            assert len(os.fsencode(tmp.name)) <= 255
    assert _temporaries(tmp_path) == []


# SIGTERM: a real process, paused where the final temporaries exist (every file of the output written,
# not yet renamed), then sent SIGTERM as kill, timeout, Slurm or docker stop would.
CHILD = """
import sys, time
from pathlib import Path
import caa.store.files as files
import transformers

ready, target, tiny = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def pause():
    ready.write_text("paused")
    time.sleep(300)

sync = files._sync
def paused_sync(tmp, path):
    if str(path) == target:
        pause()
    sync(tmp, path)
files._sync = paused_sync

if target == "conversion":  # a .gguf converted by loading the tiny model; paused once it is saved
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        load = auto.from_pretrained
        auto.from_pretrained = lambda *a, _load=load, gguf_file=None, **k: _load(tiny, **k)
    save = transformers.PreTrainedModel.save_pretrained
    def paused_save(self, *a, **k):
        save(self, *a, **k)
        pause()
    transformers.PreTrainedModel.save_pretrained = paused_save

sys.argv = ["caa", *sys.argv[4:]]
from caa.cli import main
main()
"""


def _terminated(args: list[str], target: str, tiny: Path, tmp: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``caa ARGS`` in a process paused at ``target``; SIGTERM it there; (exit code, stderr)."""
    ready = tmp / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    cmd = [sys.executable, "-c", CHILD, str(ready), target, str(tiny), *args]
    child = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"never reached {target}: {child.communicate(timeout=60)}"
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    return child.returncode, stderr


SIGTERM_COMMANDS = {
    "sweep": corpus.COMMANDS["sweep"],
    "export": "export {vectors} --behavior mood --format safetensors",
    "extract": corpus.COMMANDS["extract"],
}


@pytest.mark.parametrize("command", SIGTERM_COMMANDS)
def test_sigterm_leaves_no_temporary_and_the_old_output(command: str, valid: Valid, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.safetensors" if command == "export" else work / "out.parquet"
    args = _line(SIGTERM_COMMANDS[command], valid, tmp_path, out)
    first = runner.invoke(app, args)  # the output a rerun would replace
    assert first.exit_code == 0, _describe(first)
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    code, stderr = _terminated(args, str(out), valid.model, tmp_path, {})
    assert code == 143, stderr
    assert "terminated by SIGTERM" in stderr and "Traceback" not in stderr, stderr
    assert _temporaries(tmp_path) == []
    after = {p.name: p.read_bytes() for p in work.iterdir() if not p.name.endswith(".partial")}
    assert after == before


def test_sigterm_during_a_model_conversion_leaves_no_temporary(valid: Valid, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF not really")
    args = ["extract", str(valid.pairs), "-m", str(gguf), "-o", str(tmp_path / "out.parquet")]
    code, stderr = _terminated(args, "conversion", valid.model, tmp_path, {"CAA_CACHE": str(cache)})
    assert code == 143, stderr
    assert "terminated by SIGTERM" in stderr and "Traceback" not in stderr, stderr
    assert list((cache / "models").iterdir()) == []
    assert _temporaries(tmp_path) == []
