"""Every artifact kind of the pipeline, declared once: its columns and the fields of its metadata.

The Parquet artifacts (pairs, activations, vectors, sweep, sweep items, sweep side effects,
generations) are :data:`KINDS`; the files that are not Parquet (the sweep's plot, exports, the
report) are declared too, with the mark by which a rerun knows its own file, so that every output is
checked alike (:mod:`caa.store.outputs`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypedDict

import pyarrow as pa

SCHEMA_VERSION = 1
META_KEY = b"caa"
_SPLIT = pa.dictionary(pa.int8(), pa.string())


@dataclass(frozen=True)
class Kind:
    """One artifact kind: its name, the command that makes it, and its columns.

    ``vector`` names the column holding a fixed-size float32 list of length d_model, if any; its
    size is fixed per file, so the schema is completed with ``schema(d)``. ``version`` is the schema
    version this caa writes; ``added`` lists the columns later versions added, as (column, the version
    that added it, the value a file of an earlier version reads as), so older files still read.
    """

    name: str
    command: str
    fields: tuple[pa.Field, ...]
    vector: str | None = None
    version: int = SCHEMA_VERSION
    added: tuple[tuple[str, int, Any], ...] = ()

    def reads(self, version: object) -> bool:
        """Whether this caa reads a file of schema ``version`` of this kind."""
        return type(version) is int and SCHEMA_VERSION <= version <= self.version

    def missing_in(self, version: int) -> dict[str, Any]:
        """The columns a file of ``version`` lacks, and the value each reads as."""
        return {column: value for column, since, value in self.added if version < since}

    def schema(self, d_model: int | None = None) -> pa.Schema:
        fields = list(self.fields)
        if self.vector is not None:
            if d_model is None:
                raise ValueError(f"the {self.name} schema needs d_model")
            fields.append(pa.field(self.vector, pa.list_(pa.float32(), d_model), nullable=False))
        return pa.schema(fields)


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


PAIRS = Kind(
    "pairs",
    "caa ingest",
    (
        _f("pair_id", pa.string()),
        _f("behavior", pa.string()),
        _f("format", pa.string()),  # "ab" or "freeform"
        _f("prompt", pa.string()),
        _f("positive", pa.string()),
        _f("negative", pa.string()),
        _f("split", _SPLIT),  # "train" or "test"
        _f("source", pa.string()),  # input file name
        _f("source_row", pa.string()),  # "line 12" / "index 3" / "row 7"
    ),
)

ACTIVATIONS = Kind(
    "activations",
    "caa extract",
    (
        _f("pair_id", pa.string()),
        _f("behavior", pa.string()),
        _f("split", _SPLIT),
        _f("side", pa.string()),  # "positive" or "negative"
        _f("layer", pa.int16()),
        _f("n_tokens", pa.int32()),  # tokens of the read text (prompt + completion)
    ),
    vector="activation",
)

VECTORS = Kind(
    "vectors",
    "caa compute-vectors",
    (
        _f("behavior", pa.string()),
        _f("layer", pa.int16()),
        _f("method", pa.string()),
        _f("n_train", pa.int32(), nullable=True),  # null for imported vectors (`caa import`)
        _f("n_test", pa.int32(), nullable=True),
        _f("vector_norm", pa.float64()),
        _f("mean_residual_norm", pa.float64(), nullable=True),  # null where unknown (imported)
        _f("norm_ratio", pa.float64(), nullable=True),  # vector_norm / mean_residual_norm
        _f("pair_consistency", pa.float64(), nullable=True),  # mean cos(pair difference, mean difference)
        _f("cos_prev_layer", pa.float64(), nullable=True),
        _f("cos_next_layer", pa.float64(), nullable=True),
        _f("test_accuracy", pa.float64(), nullable=True),
        _f("test_auc", pa.float64(), nullable=True),
    ),
    vector="vector",
)

# The sweep's arms (``system``): "none" is the prompt as the sweep builds it (no system message of
# ours); "positive" and "negative" add a behavior's system prompt (`caa sweep --prompting`).
SYSTEM_ARMS = ("none", "positive", "negative")
_SYSTEM_ADDED = (("system", 2, "none"),)  # version 1 files are all arm "none"

SWEEP = Kind(
    "sweep",
    "caa sweep",
    (
        _f("behavior", pa.string()),
        _f("system", pa.string()),  # the arm: one of SYSTEM_ARMS
        _f("layer", pa.int16()),
        _f("multiplier", pa.float64()),
        _f("score_kind", pa.string()),  # "p_match" (A/B) or "logp_diff" (free-form)
        _f("score_mean", pa.float64()),
        _f("score_sem", pa.float64(), nullable=True),  # null with one item
        _f("n", pa.int32()),
        _f("delta", pa.float64()),  # score_mean minus the unsteered score_mean
        _f("delta_low", pa.float64(), nullable=True),  # paired 95% interval of delta over the items
        _f("delta_high", pa.float64(), nullable=True),
        # mean KL(unsteered || steered) per token (metadata: over what); null on the prompting arms
        _f("kl_mean", pa.float64(), nullable=True),
        _f("perplexity", pa.float64(), nullable=True),
        _f("perplexity_delta", pa.float64(), nullable=True),
        # per (behavior, layer), repeated on its rows: items' slopes of score against multiplier
        _f("slope_mean", pa.float64(), nullable=True),
        _f("slope_median", pa.float64(), nullable=True),
        _f("anti_fraction", pa.float64(), nullable=True),  # share of items with a negative slope
        _f("anti_low", pa.float64(), nullable=True),  # its seeded bootstrap 95% interval
        _f("anti_high", pa.float64(), nullable=True),
        _f("backward_items", pa.list_(pa.string())),  # ids steering most strongly backwards
    ),
    version=2,
    added=_SYSTEM_ADDED,
)

SWEEP_ITEMS = Kind(
    "sweep_items",
    "caa sweep",
    (
        _f("behavior", pa.string()),
        _f("system", pa.string()),
        _f("layer", pa.int16()),
        _f("multiplier", pa.float64()),
        _f("pair_id", pa.string()),
        _f("score", pa.float64()),
        _f("slope", pa.float64(), nullable=True),  # the item's slope at this layer, on each of its rows
    ),
    version=2,
    added=_SYSTEM_ADDED,
)

SIDE_EFFECTS = Kind(
    "sweep_side_effects",
    "caa sweep",
    (
        _f("behavior", pa.string()),  # the swept behavior whose cell is evaluated
        _f("layer", pa.int16()),
        _f("multiplier", pa.float64()),
        _f("cell", pa.string()),  # "recommended", or "best" (the best gain: none was recommended)
        _f("target", pa.string()),  # the behavior of the off-target pairs (e.g. "capability")
        _f("source", pa.string()),  # "built-in" or the file they came from
        _f("score_kind", pa.string()),  # "p_match" (A/B) or "logp_diff" (free-form)
        _f("n", pa.int32()),  # held-out items scored
        _f("unsteered", pa.float64()),  # mean score on them, unsteered
        _f("steered", pa.float64()),  # and steered at the cell
        _f("delta", pa.float64()),  # steered minus unsteered: the off-target change
        _f("delta_low", pa.float64(), nullable=True),  # its paired 95% interval; null with one item
        _f("delta_high", pa.float64(), nullable=True),
    ),
    version=2,  # written with the sweep's two tables, in their version (it is new in it)
)

GENERATIONS = Kind(
    "generations",
    "caa generate",
    (
        _f("prompt_index", pa.int32()),
        _f("prompt", pa.string()),
        _f("behavior", pa.string()),
        _f("layer", pa.int16()),
        _f("multiplier", pa.float64()),
        _f("text", pa.string()),
        _f("n_tokens", pa.int32()),  # generated tokens (up to the end-of-sequence token, excluded)
        # `--score probe`: mean over the generated tokens of the unsteered residual stream at `layer`
        # projected on the unit vector; null without it, or with no token generated
        _f("probe_score", pa.float64(), nullable=True),
        _f("judge_rating", pa.int8(), nullable=True),  # `--judge`: 1-10, null if unparseable or unjudged
    ),
    version=2,
    added=(("probe_score", 2, None), ("judge_rating", 2, None)),  # version 1 files: not scored
)

KINDS = {k.name: k for k in (PAIRS, ACTIVATIONS, VECTORS, SWEEP, SWEEP_ITEMS, SIDE_EFFECTS, GENERATIONS)}


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a model: the ``model`` entry of every artifact made with it (its fields, where
    present, are checked on read like a TypedDict's)."""

    name: str
    source: str
    weights_hash: str
    architecture: str
    num_layers: int
    hidden_size: int
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PromptMeta(TypedDict, total=False):
    """The ``prompt`` entry: how the texts were put to the model."""

    chat_template: bool
    position: str
    ab_position: str


class SourceMeta(TypedDict, total=False):
    """The ``source`` entry of imported vectors (`caa import`): where they came from."""

    file: str
    sha256: str
    format: str  # gguf, safetensors, npy, npz or sae
    feature: int | None  # the SAE feature (row of W_dec)
    hook: str | None  # the SAE's hook, e.g. blocks.12.hook_resid_post


class JudgeMeta(TypedDict, total=False):
    """The generations' ``judge`` entry (`caa generate --judge`): who rated the texts, and how."""

    url: str  # the endpoint (without any user:password part)
    model: str
    rubric: str  # the rubric sent, with {prompt} and {answer} where each text's went
    rated: int
    unparseable: int  # replies without a rating 1-10: their rows' judge_rating is null


class ProbeMeta(TypedDict, total=False):
    """The generations' ``probe`` entry (`caa generate --score probe`): what probe_score reads."""

    layer: int
    read: str  # which positions are averaged, in words


class FluencyMeta(TypedDict, total=False):
    """The sweep's ``fluency`` entry: what its KL and perplexity were measured on."""

    kind: str  # "continuation" (greedy continuations of neutral prompts) or "text" (every position)
    texts: int
    tokens: int
    continuation_tokens: int | None
    source: str


# The 'caa' metadata entry, declared once: field -> the type of its JSON value (float: any number;
# a TypedDict: an object whose fields, where present, have those types). Readers use .get(), so a
# field is checked where present; fields not declared here are left alone.
META_FIELDS: dict[str, Any] = {
    "kind": str,
    "schema_version": int,
    "command": str,
    "options": dict[str, Any],
    "caa_version": str,
    "created": str,
    "inputs": dict[str, str],  # path -> SHA-256
}
META_FIELDS_OF_KIND: dict[str, dict[str, Any]] = {
    "pairs": {"counts": dict[str, dict[str, int]]},
    "activations": {"model": Fingerprint, "prompt": PromptMeta, "layers": list[int]},
    "vectors": {
        "model": Fingerprint | None,
        "prompt": PromptMeta | None,
        "layers": list[int],
        "behaviors": list[str],
        "train_pair_ids": list[str],
        "source": SourceMeta,
    },
    "sweep": {
        "model": Fingerprint,
        "prompt": PromptMeta | None,
        "recommended": dict[str, tuple[int, float] | None],  # behavior -> [layer, multiplier]
        "best_unreliable": dict[str, tuple[int, float] | None],  # the best gain, reliable or not
        "fluency": FluencyMeta,
        "prompting": dict[str, Any],  # steering against system prompts (caa.stages.prompting)
    },
    "generations": {"model": Fingerprint, "judge": JudgeMeta, "probe": ProbeMeta},
}
META_FIELDS_OF_KIND["sweep_items"] = META_FIELDS_OF_KIND["sweep"]  # written by the same run
META_FIELDS_OF_KIND["sweep_side_effects"] = META_FIELDS_OF_KIND["sweep"]  # the same run, with --side-effects

# --- outputs that are not Parquet -------------------------------------------------------------------

PLOT = Kind("plot", "caa sweep", ())
"""The sweep's PNG plot: not Parquet; declared so that it is checked like the other outputs."""
PNG_SOFTWARE = "caa sweep"  # the plot's PNG `Software` entry, by which a rerun knows its own plot
EXPORT = Kind("export", "caa export", ())
"""Vectors written for other tools (GGUF, safetensors, .npy, .npz, lm-eval's .pt): not Parquet; declared
so that the output is checked like the others. Every export carries EXPORT_MARKER, by which a rerun
knows its own file: in the metadata of a GGUF or safetensors file, in the note of a .npy header or of
an .npz archive (:mod:`caa.store.arrays`), in the zip comment of a .pt (a zip archive too)."""
EXPORT_MARKER = b"caa.export"
REPORT = Kind("report", "caa report", ())
"""`caa report`'s HTML page: not Parquet; declared so that it is checked like the other outputs."""
REPORT_GENERATOR = "caa report"  # the page's <meta name="generator">, by which a rerun knows its own page
