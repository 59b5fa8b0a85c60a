"""KV-cache plumbing for the cached engine: rewinding a cache after a pass, repeating its rows for
every multiplier (in place where the cache allows), running a batch's shared prefix once, and the LM
head writing every pass's logits into one buffer."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from caa.models.loading import LoadedModel


def rewinder(cache: Any) -> Callable[[], Any]:
    """A function that puts ``cache`` back as it is now and returns it. A pass appends to a dynamic
    cache by concatenation, leaving the tensors it had untouched: keeping them (no copy) and putting
    them back undoes the pass. Other caches are copied."""
    layers = getattr(cache, "layers", None)
    if layers is None or type(cache).__name__ != "DynamicCache":
        saved = copy.deepcopy(cache)
        return lambda: copy.deepcopy(saved)
    states = [dict(vars(layer)) for layer in layers]

    def rewind() -> Any:
        for layer, state in zip(layers, states, strict=True):
            vars(layer).clear()
            vars(layer).update(state)
        return cache

    return rewind


def repeated(cache: Any, reps: int) -> Callable[[], Any]:
    """Each row of ``cache`` repeated ``reps`` times (once per batch), and its rewinder."""
    cache.batch_repeat_interleave(reps)
    return rewinder(cache)


def repeated_in_place(cache: Any, reps: int, tail: int) -> Callable[[], Any] | None:
    """Like :func:`repeated`, for a dynamic cache of plain layers (else None): each layer's rows
    are repeated into tensors with room for ``tail`` more positions, which a pass writes in place.
    A pass then copies only its own keys and values, where concatenation copies the whole cache, in
    every block of every pass; rewinding is forgetting how far they were written."""
    layers = getattr(cache, "layers", None)
    if type(cache).__name__ != "DynamicCache" or not layers:
        return None
    if any(
        type(layer).__name__ != "DynamicLayer" or layer.keys is None or layer.keys.dim() != 4
        for layer in layers
    ):
        return None
    start = []
    for layer in layers:
        filled = []
        for states in (layer.keys, layer.values):
            rows, heads, length, dim = states.shape
            room = states.new_empty(rows * reps, heads, length + tail, dim)
            room.view(rows, reps, heads, length + tail, dim)[:, :, :, :length] = states[:, None]
            filled.append(room)
        layer.update = _writer(layer, *filled)  # shadows DynamicLayer.update for this cache only
        start.append((filled[0][:, :, :length], filled[1][:, :, :length]))

    def rewind() -> Any:
        for layer, (keys, values) in zip(layers, start, strict=True):
            layer.keys, layer.values = keys, values
        return cache

    rewind()
    return rewind


def _writer(
    layer: Any, keys: torch.Tensor, values: torch.Tensor
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``DynamicLayer.update`` writing into ``keys`` and ``values`` after the positions held."""

    def update(
        new_keys: torch.Tensor, new_values: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        at = layer.keys.shape[-2]
        end = at + new_keys.shape[-2]
        keys[:, :, at:end] = new_keys
        values[:, :, at:end] = new_values
        layer.keys, layer.values = keys[:, :, :end], values[:, :, :end]
        return layer.keys, layer.values

    return update


def supports_prefix_cache(loaded: LoadedModel, width: int | None = None) -> bool:
    """Whether the prefix-cache engine is exact for this model on batches up to ``width`` positions
    (prefix and tail, padding included): full attention in every layer, or a sliding window wider
    than every batch. A sliding-window layer keeps only the last positions of the prefix in its
    cache; when the whole batch fits in the window it keeps them all, and nothing differs."""
    config = loaded.model.config.get_text_config()
    types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if not any("sliding" in str(t) for t in types) and not window:
        return True
    return window is not None and width is not None and width < int(window)


class ReusedLogits:
    """While open, the model's linear LM head writes the logits of every pass into the same tensor:
    a pass's logits are hundreds of MB, and on a CPU a fresh allocation that large is paged in anew
    on every pass (about a fifth of the head's time). A pass's logits are valid until the next one.
    Other heads (quantised, dispatched across devices) and CUDA (whose allocator reuses memory) are
    left as they are."""

    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.head = self.model.get_output_embeddings()
        self.out: torch.Tensor | None = None
        self.active = (
            type(self.head) is nn.Linear
            and loaded.device.type == "cpu"
            and not hasattr(self.head, "_hf_hook")
            and not getattr(self.model, "hf_device_map", None)
        )

    def __enter__(self) -> None:
        if self.active:
            self.model.set_output_embeddings(_LinearInto(self.head, self))

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.model.set_output_embeddings(self.head)


class _LinearInto(nn.Module):
    """Stands in for a linear layer, writing its output into ``kept.out`` (grown when too small)."""

    def __init__(self, linear: nn.Linear, kept: ReusedLogits):
        super().__init__()
        self.linear = linear
        self.kept = kept

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        rows = hidden.reshape(-1, hidden.shape[-1])  # [positions, d_model]
        size = rows.shape[0] * weight.shape[0]
        if self.kept.out is None or self.kept.out.numel() < size:
            self.kept.out = hidden.new_empty(size)
        out = self.kept.out[:size].view(rows.shape[0], -1)  # [positions, vocab]
        torch.mm(rows, weight.t(), out=out)  # what nn.Linear computes
        if bias is not None:
            out += bias
        return out.view(*hidden.shape[:-1], -1)


def shared_length(heads: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every one of ``heads`` has in common."""
    shortest = min(map(len, heads))
    for at in range(shortest):
        if any(h[at] != heads[0][at] for h in heads):
            return at
    return shortest


def cache_argument(loaded: LoadedModel) -> str:
    """The name the model's forward (and generate) takes a KV cache under: transformers renamed
    ``past_key_values`` to ``cache`` during 5.x."""
    return "cache" if "cache" in inspect.signature(loaded.model.forward).parameters else "past_key_values"


def prefix_cache(
    loaded: LoadedModel, heads: Sequence[Sequence[int]], cache_kwarg: str
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The KV cache of a batch's prefixes, with their ids and attention mask [texts, columns] (on
    the CPU).

    The tokens every prefix starts with (a chat template's system prompt, say) run once, in one row
    whose cache is repeated for every text; the rest of each prefix follows, padded on the left:
    columns [shared | padding | rest], with the model's own position ids (real tokens from 0).
    """
    pad = loaded.tokenizer.pad_token_id
    device = loaded.device
    shared = shared_length(heads) if len(heads) > 1 else 0
    rest = [h[shared:] for h in heads]
    r_len = max(map(len, rest))
    ids = torch.full((len(heads), shared + r_len), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, :shared] = torch.tensor(heads[0][:shared])
    mask[:, :shared] = 1
    for r, h in enumerate(rest):
        ids[r, shared + r_len - len(h) :] = torch.tensor(h)
        mask[r, shared + r_len - len(h) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def run(rows: slice, columns: slice, cache: Any) -> Any:
        out = loaded.model(
            input_ids=ids[rows, columns].to(device),
            attention_mask=mask[rows, : columns.stop].to(device),  # the cached columns and these
            position_ids=positions[rows, columns].to(device),
            use_cache=True,
            logits_to_keep=1,
            **({cache_kwarg: cache} if cache is not None else {}),
        )
        return out.get("cache") or out.get("past_key_values")

    cache = None
    if shared:
        cache = run(slice(0, 1), slice(0, shared), None)
        cache.batch_repeat_interleave(len(heads))
    if r_len:
        cache = run(slice(None), slice(shared, shared + r_len), cache)
    return cache, ids, mask
