"""The texts the sweep's fluency cost reads: neutral prompts with the unsteered model's greedy
continuations (``answer``, ``prompt-end``), or neutral text read at every position (``all``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from caa.core.budget import run_halving
from caa.core.distributed import ONE, Shard
from caa.core.prompts import Encoded, PromptFormat, collate, read_texts
from caa.errors import CaaError, InputError
from caa.evaluation.engines import ScoreText
from caa.evaluation.kvcache import cache_argument, prefix_cache, supports_prefix_cache
from caa.models.loading import LoadedModel

CONTINUATION_TOKENS = 32


@torch.inference_mode()
def fluency_texts(
    loaded: LoadedModel,
    style: PromptFormat,
    neutral: Sequence[str],
    positions: str,
    source: str = "neutral texts",
    new_tokens: int = CONTINUATION_TOKENS,
    batch_size: int = 16,
    shard: Shard = ONE,
    notice: Callable[[str], None] | None = None,
) -> list[ScoreText]:
    """The texts the fluency cost reads, in the regime being swept.

    ``all``: each neutral text as it is, read at every position. ``answer`` and ``prompt-end``: each
    neutral text is a prompt (chat format where the model has one), which the unsteered model
    continues greedily for ``new_tokens`` tokens, once; the continuation is read teacher-forced, the
    prompt left unsteered. ``source`` names the texts in errors; ``shard`` shares the continuations
    out over processes; ``notice`` hears of batches retried after running out of CUDA memory.
    """
    tok = loaded.tokenizer
    limit = loaded.context_length
    extra = 0 if positions == "all" else new_tokens
    encoded = []
    for number, text in enumerate(neutral, start=1):
        ids = tok(text)["input_ids"] if positions == "all" else _prompt_ids(tok, style, text)
        if limit is not None and len(ids) + extra > limit:
            grown = f" and its {extra}-token continuation" if extra else ""
            raise CaaError(
                f"{source}: text {number} is {len(ids)} tokens{grown}, longer than the model's context "
                f"of {limit}: shorten it"
            )
        encoded.append(ids)
    if positions == "all":
        texts = [ScoreText(tuple(ids), 0, 0, len(ids) - 1) for ids in encoded if len(ids) > 1]
    else:
        texts = _continue(loaded, encoded, new_tokens, batch_size, shard, notice)
    if not texts:
        raise CaaError(f"{source}: no text is long enough (two tokens or more) for the fluency cost")
    return texts


def _prompt_ids(tok: Any, style: PromptFormat, prompt: str) -> list[int]:
    return list(tok(style.prefix(tok, prompt), add_special_tokens=not style.chat)["input_ids"])


def _continue(
    loaded: LoadedModel,
    prompts: Sequence[list[int]],
    new_tokens: int,
    batch_size: int,
    shard: Shard = ONE,
    notice: Callable[[str], None] | None = None,
) -> list[ScoreText]:
    """Each prompt with the unsteered model's greedy continuation (up to and with its first EOS).
    A batch that runs out of CUDA memory is retried in halves (said in ``notice``)."""
    tok = loaded.tokenizer
    eos = tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    plan = [order[at : at + batch_size] for at in range(0, len(order), batch_size)]
    cost = lambda index: len(index) * max(len(prompts[i]) for i in index)  # noqa: E731
    cache_kwarg = cache_argument(loaded)

    def one(index: list[int]) -> list[tuple[int, ScoreText]]:
        batch = [prompts[i] for i in index]
        width = max(map(len, batch)) + new_tokens
        if len(batch) > 1 and min(map(len, batch)) > 1 and supports_prefix_cache(loaded, width):
            # all but each prompt's last token run as the engine runs prefixes: the tokens every
            # prompt starts with (a chat template's system prompt) once for the whole batch
            cache, ids, mask = prefix_cache(loaded, [p[:-1] for p in batch], cache_kwarg)
            last = torch.tensor([[p[-1]] for p in batch])
            ids, mask = torch.cat([ids, last], 1), torch.cat([mask, torch.ones_like(last)], 1)
            given = {cache_kwarg: cache}
        else:
            padded = collate([Encoded(p, 0, [0]) for p in batch], tok.pad_token_id)
            ids, mask, given = padded.input_ids, padded.attention_mask, {}
        out = loaded.model.generate(
            input_ids=ids.to(loaded.device),
            attention_mask=mask.to(loaded.device),
            max_new_tokens=new_tokens,
            min_new_tokens=1,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            **given,
        )
        made = []
        for i, row in zip(index, out[:, ids.shape[1] :].tolist(), strict=True):
            new = row[: row.index(eos) + 1] if eos in row else row
            prompt = prompts[i]
            made.append((i, ScoreText(tuple(prompt + new), len(prompt), len(prompt) - 1, len(new))))
        return made

    # a split batch could change a greedy token: the plan's batches, split only on running out of memory
    mine = shard.take(plan, cost, split=False)
    made = [pair for done in run_halving(mine, one, notice, "neutral prompts") for pair in done]
    return [text for _, text in sorted(shard.merge(made), key=lambda pair: pair[0])]


def default_neutral(positions: str) -> Path:
    """The project's neutral texts for the fluency cost: prompts to continue (``answer``,
    ``prompt-end``) or text read at every position (``all``): the files shipped in the package,
    found from any directory and in any install (caa.datasets)."""
    from caa.store import datasets

    return datasets.default_neutral(positions)


def read_neutral(path: Path, limit: int, positions: str = "all") -> list[str]:
    """Neutral texts: ``{"text": ...}`` objects for ``all``, ``{"prompt": ...}`` for the other
    policies (.jsonl; either field is accepted), one per line (.txt), or a column (.parquet)."""
    first, second = ("text", "prompt") if positions == "all" else ("prompt", "text")
    try:
        return read_texts(path, first)[:limit]
    except InputError as e:
        if path.suffix.lower() == ".txt" or e.field != first:
            raise
        return read_texts(path, second)[:limit]
