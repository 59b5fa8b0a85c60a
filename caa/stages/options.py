"""Each stage's options, declared once: a frozen dataclass per stage whose fields are the options'
names, types and defaults. The Python API takes one (``caa.sweep(..., caa.SweepOptions(...))``), the
command line builds one from its parsed flags by the same names (``--max-kl`` is ``max_kl``), the
provenance of every artifact is ``dataclasses.asdict`` of it, and ``check`` refuses a value that
cannot work, once, naming the option (:class:`caa.errors.OptionError`).

Values are typed (layers as ints, multipliers as floats, memory in bytes): text such as ``4-20`` or
``8GiB`` is parsed where it is typed, by the command line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeAlias
from urllib.parse import urlsplit

from caa.core.hooks import STEER_POSITIONS
from caa.core.prompts import POSITIONS, TEMPLATES
from caa.errors import CaaError, OptionError
from caa.evaluation.judge import public_url
from caa.store.text import NAME_PROBLEM, behavior_name, text_problem

Template: TypeAlias = Literal["auto", "on", "off"]
SteerPositions: TypeAlias = Literal["answer", "prompt-end", "all"]
Scale: TypeAlias = Literal["raw", "residual"]
ENGINES = ("fast", "naive")
SPLITS = ("all", "train", "test")
SCALES = ("raw", "residual")
SCORES = ("probe",)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MIN_TEMPERATURE = 1e-3  # logits / 1e-300 overflow to inf and the sampling probabilities to NaN


def _require(ok: bool, option: str, value: object, problem: str) -> None:
    if not ok:
        raise OptionError(option, value, problem)


def _choice(option: str, value: str, choices: Sequence[str]) -> None:
    _require(value in choices, option, value, f"use one of {', '.join(choices)}")


def _whole(option: str, value: object, lowest: int = 0, below: int | None = None, problem: str = "") -> None:
    """An int (not a bool, not a float such as 3.7) from ``lowest`` (and below ``below``)."""
    _require(isinstance(value, int) and not isinstance(value, bool), option, value, "must be a whole number")
    assert isinstance(value, int)
    _require(
        lowest <= value and (below is None or value < below),
        option,
        value,
        problem or f"must be at least {lowest}",
    )


def check_behavior(option: str, value: str) -> str:
    """A behavior name as caa keeps it (NFC, see :func:`caa.store.text.behavior_name`), refusing
    what is not text or shows nothing."""
    _require(isinstance(value, str), option, value, "must be a behavior name (text)")
    problem = text_problem(value)
    _require(problem is None, option, value, problem or "")
    name = behavior_name(value)
    _require(name is not None, option, value, NAME_PROBLEM)
    assert name is not None
    return name


def _names(option: str, values: Sequence[str] | None) -> tuple[str, ...] | None:
    """A list of behavior names, refusing a lone string (which Python would split into its
    characters); each checked by :func:`check_behavior`."""
    if values is None:
        return None
    _require(not isinstance(values, str), option, values, "must be a list of names, not one string")
    return tuple(check_behavior(option, v) for v in values)


def _sets(option: str, values: Sequence[str]) -> tuple[str, ...]:
    """Names of datasets or files, each non-blank text, refusing a lone string."""
    _require(not isinstance(values, str), option, values, "must be a list of names, not one string")
    for value in values:
        _require(
            isinstance(value, str) and bool(value.strip()), option, list(values), f"{value!r} names nothing"
        )
    return tuple(v.strip() for v in values)


def check_layers(option: str, layers: Sequence[int] | None) -> tuple[int, ...] | None:
    """Layers as whole numbers (the model's range is checked where the model is known)."""
    if layers is None:
        return None
    _require(not isinstance(layers, (str, int)), option, layers, "must be a list of layers")
    for layer in layers:
        _require(
            isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0,
            option,
            list(layers),
            f"{layer!r} is not a layer (a whole number from 0)",
        )
    return tuple(sorted(set(layers)))


def check_multipliers(option: str, values: Sequence[float], *, with_zero: bool) -> tuple[float, ...]:
    """Multipliers as finite floats, sorted and each once; ``with_zero`` adds 0 (a sweep's unsteered
    baseline)."""
    _require(not isinstance(values, (str, int, float)), option, values, "must be a list of numbers")
    _require(len(values) > 0, option, list(values), "must name at least one multiplier")
    floats = []
    for value in values:
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            option,
            list(values),
            f"{value!r} is not a number",
        )
        _require(math.isfinite(value), option, list(values), f"{value!r} is not finite")
        floats.append(float(value))
    return tuple(sorted(set(floats) | ({0.0} if with_zero else set())))


def _web_url(text: str) -> bool:
    """Whether ``text`` is an http(s) URL with a host (and, if any, a valid port)."""
    try:
        url = urlsplit(text)
        return url.scheme in ("http", "https") and bool(url.hostname) and (url.port or 0) >= 0
    except ValueError:  # "http://[::1", "http://host:port"
        return False


class _Options:
    """What every stage's options do: check themselves, and say what they were."""

    def check(self) -> None:
        """Refuse a value that cannot work (before any model loads)."""

    def provenance(self) -> dict[str, Any]:
        """The options as an artifact's metadata records them (JSON values)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]

    def __post_init__(self) -> None:
        self.check()


@dataclass(frozen=True)
class IngestOptions(_Options):
    """``caa ingest``: ``behavior`` names every file's pairs (default: each file's stem); ``mapping``
    renames columns (``{"positive": "chosen"}``); ``test_fraction`` of the pairs is held out, decided
    by each pair's id and ``seed``; ``skip_invalid`` keeps the valid rows and lists the others."""

    behavior: str | None = None
    test_fraction: float = 0.2
    seed: int = 0
    mapping: dict[str, str] = field(default_factory=dict)
    skip_invalid: bool = False

    def check(self) -> None:
        if self.behavior is not None:
            object.__setattr__(self, "behavior", check_behavior("behavior", self.behavior))
        _whole("seed", self.seed, 0, 2**63, "must be at least 0 and below 2**63")


@dataclass(frozen=True)
class ExtractOptions(_Options):
    """``caa extract``: ``layers`` (None: every block; layer l is the output of decoder block l) of
    the pairs of ``split`` and ``behaviors``; free-form pairs read at their ``last`` completion token
    or the ``mean`` over it (A/B pairs at the answer letter); ``batch_size`` texts per pass;
    ``truncate`` cuts the start of prompts longer than the context (else they are an error)."""

    layers: tuple[int, ...] | None = None
    split: Literal["all", "train", "test"] = "all"
    behaviors: tuple[str, ...] | None = None
    position: Literal["last", "mean"] = "last"
    chat_template: Template = "auto"
    batch_size: int = 32
    truncate: bool = False

    def check(self) -> None:
        object.__setattr__(self, "layers", check_layers("layers", self.layers))
        object.__setattr__(self, "behaviors", _names("behaviors", self.behaviors))
        _choice("split", self.split, SPLITS)
        _choice("position", self.position, [p for p in POSITIONS if p != "answer"])
        _choice("chat_template", self.chat_template, TEMPLATES)
        _whole("batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class SweepOptions(_Options):
    """``caa sweep``: every (layer, multiplier) on the held-out pairs of ``behaviors`` (default: all
    in both files), at most ``max_pairs`` each; ``layers`` None: the vectors' layers; 0 is always
    among the multipliers. The fluency cost reads ``neutral_count`` neutral texts; the recommendation
    keeps the mean KL under ``max_kl`` and, with ``max_anti``, at most that share of items steering
    backwards. ``engine`` ``fast`` reuses each prompt's KV cache, ``naive`` is the reference;
    ``max_memory`` (bytes) and ``batch_size`` size the batches; ``seed`` seeds the bootstrap.
    ``side_effects`` names sets of pairs (built-in names, ``capability`` among them, or files) on
    whose held-out items, at most ``side_effects_max_items`` each, every behavior's chosen cell is
    evaluated afterwards (:mod:`caa.stages.side_effects`).
    ``prompting`` adds the system-prompt arms (positive, negative) at every swept layer, or at
    ``prompting_layer`` only; ``system_positive`` / ``system_negative`` give their prompts (default:
    the built-in datasets' cards) (:mod:`caa.stages.prompting`)."""

    behaviors: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    multipliers: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
    max_pairs: int | None = None
    neutral_count: int = 16
    max_kl: float = 0.5
    max_anti: float | None = None
    seed: int = 0
    steer_positions: SteerPositions = "answer"
    scale: Scale = "raw"
    engine: Literal["fast", "naive"] = "fast"
    chat_template: Template = "auto"
    truncate: bool = False
    max_memory: int | None = None
    batch_size: int | None = None
    side_effects: tuple[str, ...] = ()
    side_effects_max_items: int = 50
    prompting: bool = False
    prompting_layer: int | None = None
    system_positive: str | None = None
    system_negative: str | None = None

    def check(self) -> None:
        object.__setattr__(self, "behaviors", _names("behaviors", self.behaviors))
        object.__setattr__(self, "side_effects", _sets("side_effects", self.side_effects))
        _whole("side_effects_max_items", self.side_effects_max_items, 1)
        object.__setattr__(self, "layers", check_layers("layers", self.layers))
        mults = check_multipliers("multipliers", self.multipliers, with_zero=True)
        object.__setattr__(self, "multipliers", mults)
        if self.max_pairs is not None:
            _whole("max_pairs", self.max_pairs, 1)
        _whole("neutral_count", self.neutral_count, 1)
        _require(self.max_kl >= 0, "max_kl", self.max_kl, "must be 0 or above")
        _require(
            self.max_anti is None or 0 <= self.max_anti <= 1,
            "max_anti",
            self.max_anti,
            "must be between 0 and 1",
        )
        _whole("seed", self.seed, 0, 2**32, "must be between 0 and 2**32 - 1")
        _choice("steer_positions", self.steer_positions, STEER_POSITIONS)
        _choice("scale", self.scale, SCALES)
        _choice("engine", self.engine, ENGINES)
        _choice("chat_template", self.chat_template, TEMPLATES)
        if self.max_memory is not None:
            _whole("max_memory", self.max_memory, 1)
        if self.batch_size is not None:
            _whole("batch_size", self.batch_size, 1)
        self._check_prompting()

    def _check_prompting(self) -> None:
        _require(isinstance(self.prompting, bool), "prompting", self.prompting, "must be True or False")
        needs = "needs prompting on (--prompting)"
        if self.prompting_layer is not None:
            _require(self.prompting, "prompting_layer", self.prompting_layer, needs)
            _whole("prompting_layer", self.prompting_layer)
            swept = self.layers
            _require(
                swept is None or self.prompting_layer in swept,
                "prompting_layer",
                self.prompting_layer,
                f"is not among the swept layers ({', '.join(map(str, swept or ()))})",
            )
        for option in ("system_positive", "system_negative"):
            value = getattr(self, option)
            if value is None:
                continue
            _require(isinstance(value, str), option, value, "must be text")
            _require(self.prompting, option, value, needs)
            _require(text_problem(value) is None, option, value, text_problem(value) or "")
            _require(bool(value.strip()), option, value, "must not be empty")


@dataclass(frozen=True)
class GenerateOptions(_Options):
    """``caa generate``: steer ``layer`` with ``behavior``'s vector (needed when the file holds
    several) at each of ``multipliers`` (a column each), ``max_new_tokens`` per completion, greedy
    unless ``temperature`` > 0 (then ``top_p`` and ``seed``), ``batch_size`` prompts per batch.

    ``score`` ``probe`` scores each text by the unsteered model's mean projection on the unit vector
    over its generated tokens (:mod:`caa.stages.probe`). ``judge`` (an OpenAI-compatible API's base
    URL, e.g. ``http://127.0.0.1:8000/v1``) has ``judge_model`` rate each text 1-10, with the key
    held by the environment variable named ``judge_key_env``; ``judge_workers`` requests at a time,
    each tried ``1 + judge_retries`` times, waiting ``judge_timeout`` seconds per try."""

    layer: int
    behavior: str | None = None
    multipliers: tuple[float, ...] = (-1.0, 0.0, 1.0)
    max_new_tokens: int = 48
    steer_positions: SteerPositions = "answer"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat_template: Template = "auto"
    scale: Scale = "raw"
    batch_size: int = 32
    score: Literal["probe"] | None = None
    judge: str | None = None
    judge_model: str | None = None
    judge_key_env: str = "OPENAI_API_KEY"
    judge_workers: int = 4
    judge_retries: int = 4
    judge_timeout: float = 60.0

    def check(self) -> None:
        _whole("layer", self.layer)
        if self.behavior is not None:
            object.__setattr__(self, "behavior", check_behavior("behavior", self.behavior))
        mults = check_multipliers("multipliers", self.multipliers, with_zero=False)
        object.__setattr__(self, "multipliers", mults)
        _whole("batch_size", self.batch_size, 1)
        _whole("max_new_tokens", self.max_new_tokens, 1)
        _require(
            self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < float("inf"),
            "temperature",
            self.temperature,
            f"must be 0 (greedy) or a finite number from {MIN_TEMPERATURE} "
            "(below, the logits divided by it overflow and sampling breaks)",
        )
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "must be above 0 and at most 1")
        _whole("seed", self.seed, 0, 2**63, "must be at least 0 and below 2**63")
        _choice("steer_positions", self.steer_positions, STEER_POSITIONS)
        _choice("scale", self.scale, SCALES)
        _choice("chat_template", self.chat_template, TEMPLATES)
        if self.score is not None:
            _choice("score", self.score, SCORES)
        self._check_judge()

    def _check_judge(self) -> None:
        if self.judge is not None:
            _require(
                isinstance(self.judge, str) and _web_url(self.judge),
                "judge",
                self.judge,
                "must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1",
            )
            url = urlsplit(self.judge)
            _require(
                url.username is None,
                "judge",
                public_url(self.judge),
                "no user:password in the URL: put the key in the environment variable judge_key_env names",
            )
            _require(self.judge_model is not None, "judge_model", None, "name the judge's model")
        else:
            _require(self.judge_model is None, "judge_model", self.judge_model, "only with a judge URL")
        if self.judge_model is not None:
            _require(
                isinstance(self.judge_model, str) and text_problem(self.judge_model) is None,
                "judge_model",
                self.judge_model,
                "must be a model name",
            )
        if not isinstance(self.judge_key_env, str) or not _ENV_NAME.fullmatch(self.judge_key_env):
            # not an OptionError: its value may be a key given by mistake, and is not repeated
            raise CaaError(
                "judge_key_env: must be the name of an environment variable (letters, digits and _, "
                "e.g. OPENAI_API_KEY) that holds the key, never the key itself"
            )
        _whole("judge_workers", self.judge_workers, 1, 65, "must be from 1 to 64")
        _whole("judge_retries", self.judge_retries, 0, 11, "must be from 0 to 10")
        _require(
            isinstance(self.judge_timeout, (int, float))
            and not isinstance(self.judge_timeout, bool)
            and 0 < self.judge_timeout < float("inf"),
            "judge_timeout",
            self.judge_timeout,
            "must be a number of seconds above 0",
        )
