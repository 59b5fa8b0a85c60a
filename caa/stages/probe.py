"""The steering vector as a detector: how far a generated text lies along it, read by the unsteered model.

``probe score`` of a generation = the mean, over its generated tokens, of the residual stream at
layer l (the output of decoder block l, as ``caa extract`` reads it) of the *unsteered* model reading
prompt + generation, projected on the unit vector ``v / |v|``. The positions averaged are those of
the generated tokens only (each token's own position: the state after reading it), up to the
end-of-sequence token, excluded; not the prompt, not its last token (which predicted the first
generated token). A generation with no token has no score (nan). Mean-difference vectors detect
their concept well (AxBench: AUROC 0.94), so the score says whether the text moved along the vector
as the multiplier did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from caa.core.prompts import Encoded, collate
from caa.errors import CaaError
from caa.models.loading import LoadedModel
from caa.stages.extract import forward_layers

READ = "the generated tokens (each at its own position, end-of-sequence excluded), not the prompt"


def unit(vector: torch.Tensor, layer: int) -> torch.Tensor:
    """``vector / |vector|`` in float32; a vector of norm 0 has no direction and is refused."""
    v = vector.detach().float().reshape(-1)
    norm = torch.linalg.vector_norm(v)
    if not torch.isfinite(norm) or norm == 0:
        raise CaaError(f"the vector at layer {layer} has norm {float(norm):g}: no direction to project on")
    return v / norm


@torch.inference_mode()
def probe_scores(
    loaded: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    generated_ids: Sequence[Sequence[int]],
    vector: torch.Tensor,
    layer: int,
) -> list[float]:
    """The probe score of each generation (see the module's docstring): row r is
    ``prompt_ids[r] + generated_ids[r]``, all rows in one unsteered forward pass that stops after
    block ``layer``; nan where ``generated_ids[r]`` is empty."""
    direction = unit(vector, layer).to(loaded.device)  # [d_model]
    scores = [float("nan")] * len(prompt_ids)
    rows = [r for r, new in enumerate(generated_ids) if len(new)]
    if not rows:
        return scores
    items = [
        Encoded(
            input_ids=[*prompt_ids[r], *generated_ids[r]],
            completion_start=len(prompt_ids[r]),
            read=list(range(len(prompt_ids[r]), len(prompt_ids[r]) + len(generated_ids[r]))),
        )
        for r in rows
    ]
    batch = collate(items, loaded.tokenizer.pad_token_id)
    means = forward_layers(loaded, batch, [layer])[:, 0]  # [rows, d_model] float32: the mean over each read
    projected = (means @ direction).tolist()  # the mean of the projections is the projection of the mean
    for r, value in zip(rows, projected, strict=True):
        scores[r] = value
    return scores
