"""`caa generate`: steered generation, every prompt under several multipliers, side by side.

Prompts are generated in batches of ``batch_size`` prompts (each under every multiplier), shortest
first; under ``accelerate launch`` the batches are shared out over the processes and the main
process gets every row back (:mod:`caa.core.distributed`), the rows one process generates.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch

from caa.core.budget import run_halving
from caa.core.distributed import ONE, Shard
from caa.core.hooks import deltas, steer_start, steering
from caa.core.prompts import Encoded, collate, prompt_format, read_texts
from caa.errors import CaaError
from caa.evaluation.judge import Judge, JudgeError, fill, public_url, rubric
from caa.evaluation.text_scores import score_table
from caa.models.loading import LoadedModel
from caa.stages.checks import check_model, check_strength, check_template
from caa.stages.options import GenerateOptions
from caa.stages.probe import READ, probe_scores, unit
from caa.stages.vectors import VectorSet
from caa.store.artifacts import make_meta, read_artifact, write_artifact
from caa.store.datasets import builtin
from caa.store.schemas import GENERATIONS


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt (one per line), .jsonl ({"prompt": ...}) or .parquet (a prompt column)."""
    return read_texts(path, "prompt")


@dataclass
class Generations:
    """Steered texts, one row per (prompt, multiplier), with their provenance; :meth:`save` writes
    ``generations.parquet`` and :meth:`read` reads it."""

    frame: pd.DataFrame  # prompt_index, prompt, behavior, layer, multiplier, text, n_tokens (+ scores)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path | str) -> Path:
        frame = self.frame.copy()
        for name, _, _ in GENERATIONS.added:  # the scores not asked for: null
            if name not in frame:
                frame[name] = None
        frame = frame.astype({"probe_score": "float64", "judge_rating": "Int8"})
        table = pa.Table.from_pandas(frame[GENERATIONS.schema().names], preserve_index=False)
        write_artifact(table, Path(path), GENERATIONS, self.meta)
        return Path(path)

    @classmethod
    def read(cls, path: Path | str) -> Generations:
        art = read_artifact(Path(path), GENERATIONS)
        return cls(art.table.to_pandas(), art.meta)

    def side_by_side(self) -> pd.DataFrame:
        """One row per prompt, one column per multiplier."""
        return self.frame.pivot(index="prompt", columns="multiplier", values="text")

    def scores(self) -> pd.DataFrame:
        """Per multiplier, the mean probe score and judge rating with their 95% intervals (the
        columns of :func:`caa.evaluation.text_scores.score_table`; none for a score not taken)."""
        return score_table(self.frame)

    def unparseable(self) -> int:
        """How many texts the judge rated without a rating 1-10 in its reply (0 if not judged)."""
        return int(self.meta.get("judge", {}).get("unparseable", 0))


def gather_prompts(
    prompts: Sequence[str], prompts_file: Path | None = None, limit: int | None = None
) -> tuple[list[str], list[str]]:
    """The prompts given one by one, then those of ``prompts_file`` (at most ``limit``), with the
    label that names each in errors (``--prompt 2``, ``prompts.txt: prompt 3``)."""
    if limit is not None and limit < 1:
        raise CaaError(f"--limit {limit}: must be at least 1")
    from_file = read_prompts(prompts_file)[:limit] if prompts_file else []
    labels = [f"--prompt {i}" for i in range(1, len(prompts) + 1)]
    labels += [f"{prompts_file}: prompt {i}" for i in range(1, len(from_file) + 1)]
    texts = [*prompts, *from_file]
    if not texts:
        raise CaaError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return texts, labels


@torch.inference_mode()
def generate_steered(
    loaded: LoadedModel,
    prompts: Sequence[str],
    vector: torch.Tensor,
    options: GenerateOptions,
    *,
    behavior: str = "",
    labels: Sequence[str] | None = None,
    shard: Shard = ONE,
    notice: Callable[[str], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> Generations:
    """Generate every prompt under every one of ``options.multipliers``, ``options.batch_size``
    prompts per batch; ``on_rows`` gets the number of texts each finished batch made.

    Steering adds ``multiplier * vector`` to block ``options.layer``'s output at the positions
    ``options.steer_positions`` names (:func:`caa.core.hooks.steer_start`): by default the paper's,
    every generated token but not the prompt, so the first new token is predicted from the unsteered
    last prompt position. Greedy unless ``options.temperature`` > 0 (batch k samples from seed
    ``seed + k``). ``labels`` name the prompts in errors
    (default: ``prompt N``). Under ``shard`` each process generates its batches and all get every row.
    A batch that runs out of CUDA memory is retried in halves, said in ``notice`` (a retried half
    samples from its batch's seed).

    With ``options.score`` ``probe``, each text gets its ``probe_score``
    (:func:`caa.stages.probe.probe_scores`: the unsteered model's mean projection on ``vector / |vector|``
    at ``options.layer`` over the generated tokens), one unsteered forward pass per batch.
    """
    if not prompts:
        raise CaaError("no prompts given")
    for number, prompt in enumerate(prompts, start=1):
        if not isinstance(prompt, str):
            label = labels[number - 1] if labels else f"prompt {number}"
            raise CaaError(f"{label}: a prompt must be text, not {type(prompt).__name__}")
    layer, multipliers, max_new_tokens = options.layer, list(options.multipliers), options.max_new_tokens
    batch_size = options.batch_size
    style = prompt_format(loaded.tokenizer, options.chat_template)
    tok = loaded.tokenizer
    encoded = []
    limit = loaded.context_length
    for number, prompt in enumerate(prompts, start=1):
        ids = tok(style.prefix(tok, prompt), add_special_tokens=not style.chat)["input_ids"]
        if limit is not None and len(ids) + max_new_tokens > limit:
            label = labels[number - 1] if labels else f"prompt {number}"
            raise CaaError(
                f"{label} ({prompt[:40]!r}...) is {len(ids)} tokens: with --max-new-tokens "
                f"{max_new_tokens} it exceeds the model's context of {limit} tokens"
            )
        encoded.append(Encoded(ids, len(ids), [len(ids) - 1]))
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i].input_ids))
    plan = [sorted(order[at : at + batch_size]) for at in range(0, len(order), batch_size)]
    cost = lambda index: len(index) * max(len(encoded[i].input_ids) for i in index)  # noqa: E731
    batch_of = {i: k for k, index in enumerate(plan) for i in index}  # a retried half keeps its seed

    def one(index: list[int]) -> list[dict[str, Any]]:
        new = _generate_batch(
            loaded,
            [encoded[i] for i in index],
            vector,
            layer,
            multipliers,
            positions=options.steer_positions,
            max_new_tokens=max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed + batch_of[index[0]],
        )
        rows = [(i, m) for i in index for m in multipliers]
        new = [ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids for ids in new]
        probe: list[float | None] = [None] * len(rows)
        if options.score == "probe":
            prompt_ids = [encoded[i].input_ids for i, _ in rows]
            probe = [None if v != v else v for v in probe_scores(loaded, prompt_ids, new, vector, layer)]
        made = []
        for (i, m), ids, score in zip(rows, new, probe, strict=True):
            made.append(
                {
                    "prompt_index": i,
                    "prompt": prompts[i],
                    "behavior": behavior,
                    "layer": layer,
                    "multiplier": float(m),
                    "text": tok.decode(ids, skip_special_tokens=True).strip(),
                    "n_tokens": len(ids),
                    "probe_score": score,
                    "judge_rating": None,
                }
            )
        if on_rows:
            on_rows(len(made))
        return made

    # a split batch could change a greedy token: the plan's batches, split only on running out of memory
    mine = shard.take(plan, cost, split=False)
    records = [record for made in run_halving(mine, one, notice, "prompts") for record in made]
    column = {float(m): k for k, m in enumerate(multipliers)}
    records = sorted(shard.merge(records), key=lambda r: (r["prompt_index"], column[r["multiplier"]]))
    return Generations(pd.DataFrame(records))


def _generate_batch(
    loaded: LoadedModel,
    encoded: Sequence[Encoded],
    vector: torch.Tensor,
    layer: int,
    multipliers: Sequence[float],
    *,
    positions: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list[list[int]]:
    """The new token ids of each prompt under each multiplier (prompt-major), one ``generate`` call."""
    tok = loaded.tokenizer
    rows = [(e, m) for e in encoded for m in multipliers]
    batch = collate([e for e, _ in rows], tok.pad_token_id).to(loaded.device)
    start = steer_start(positions, torch.tensor([len(e.input_ids) for e, _ in rows]))
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    with steering(loaded.blocks, {layer: deltas(vector, [m for _, m in rows])}, start):
        out = loaded.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            **sampling,
        )
    return [list(row) for row in out[:, batch.input_ids.shape[1] :].cpu().tolist()]


def run_generate(
    loaded: LoadedModel,
    vectors: VectorSet,
    prompts: Sequence[str],
    options: GenerateOptions,
    *,
    labels: Sequence[str] | None = None,
    provenance: dict[str, Any] | None = None,
    inputs: dict[str, Path] | None = None,
    shard: Shard = ONE,
    notice: Callable[[str], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
    on_judged: Callable[[int], None] | None = None,
) -> Generations:
    """Check the vectors against the model, pick the behavior's vector, generate (``on_rows``: texts
    made, batch by batch), score with the probe if ``options.score`` says so, and with
    ``options.judge`` have the judge rate every text (on the main process; ``on_judged``: texts
    rated); the options, the ``provenance`` given (what a command was told besides) and ``inputs``
    (files, hashed) go into the result's metadata. A judge that fails raises its
    :class:`caa.evaluation.judge.JudgeError` with the unrated generations as its ``partial``."""
    check_model(vectors, loaded)
    check_template(vectors, prompt_format(loaded.tokenizer, options.chat_template))
    behavior = vectors.pick(options.behavior)
    vector = vectors.tensor(behavior, options.layer, options.scale)
    check_strength({options.layer: vector}, options.multipliers, loaded)  # as the sweep checks it
    if options.score == "probe":
        unit(vector, options.layer)  # a vector without a direction, refused before any work
    gens = generate_steered(
        loaded,
        prompts,
        vector,
        options,
        behavior=behavior,
        labels=labels,
        shard=shard,
        notice=notice,
        on_rows=on_rows,
    )
    meta = {**options.provenance(), **(provenance or {})}
    extra: dict[str, Any] = {"model": loaded.fingerprint.to_dict()}
    if options.score == "probe":
        extra["probe"] = {"layer": options.layer, "read": READ}
    gens.meta = make_meta(GENERATIONS, meta, inputs=inputs, **extra)
    if options.judge and shard.main:
        judge_generations(gens, judge_of(options), on_judged)
    return gens


def judge_of(options: GenerateOptions) -> Judge:
    """The judge ``options`` name, its key read from the environment variable
    ``options.judge_key_env`` (none sent if it is unset or empty)."""
    assert options.judge is not None and options.judge_model is not None  # GenerateOptions.check
    return Judge(
        url=options.judge,
        model=options.judge_model,
        key=os.environ.get(options.judge_key_env) or None,
        retries=options.judge_retries,
        timeout=options.judge_timeout,
        workers=options.judge_workers,
    )


def judge_generations(
    gens: Generations, judge: Judge, on_judged: Callable[[int], None] | None = None
) -> Generations:
    """Have ``judge`` rate every text of ``gens`` 1-10 for its behavior, in place: the ratings into
    ``judge_rating`` (null where the reply held none), the endpoint, the model, the rubric and the
    count of unparseable replies into the metadata's ``judge`` entry. The rubric
    (:func:`caa.evaluation.judge.rubric`) gives the behavior's name, and its card's description when
    it is a built-in dataset's. ``on_judged`` gets 1 per text rated."""
    behaviors = sorted(set(gens.frame.behavior))
    if len(behaviors) != 1:
        raise CaaError(f"the generations hold {len(behaviors)} behaviors ({', '.join(behaviors)}): judge one")
    card = builtin(behaviors[0])
    template = rubric(behaviors[0], card.description if card else None)
    texts = [fill(template, r.prompt, r.text) for r in gens.frame.itertuples()]
    try:
        ratings = judge.rate(texts, on_judged)
    except JudgeError as e:
        e.partial = gens
        raise
    gens.frame["judge_rating"] = pd.array(ratings, dtype="Int8")
    gens.meta["judge"] = {
        "url": public_url(judge.url),
        "model": judge.model,
        "rubric": template,
        "rated": len(ratings),
        "unparseable": sum(r is None for r in ratings),
    }
    return gens
