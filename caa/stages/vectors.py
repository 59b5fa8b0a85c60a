"""`caa compute-vectors`: mean-difference steering vectors per behavior and layer, with diagnostics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from caa.errors import CaaError, InputError
from caa.stages.extract import Activations
from caa.store.artifacts import make_meta, read_artifact, vectors_of, write_artifact
from caa.store.schemas import VECTORS
from caa.store.text import same_name

METHODS = ("mean", "pca")
SCALES = ("raw", "residual")  # what a multiplier multiplies: the vector, or a residual-norm-length one
ABSURD_RATIO = 100.0  # a vector this many times its layer's mean residual norm is an error, not a choice


def vector_rows(acts: Activations, method: str = "mean") -> pd.DataFrame:
    """One row per (behavior, layer): the steering vector and its diagnostics.

    ``mean``: mean over training pairs of (positive - negative), accumulated in float64.
    ``pca``: first principal component of the training differences, signed to agree with the mean
    difference and scaled to the mean difference's length along it.
    """
    if method not in METHODS:
        raise CaaError(f"--method '{method}': use one of {', '.join(METHODS)}")
    rows = []
    keys = acts.keys
    for (behavior, layer), group in keys.groupby(["behavior", "layer"], sort=True):
        pos, neg = _aligned(group, acts.label, behavior, layer)
        train = (pos.split == "train").to_numpy()
        if not train.any():
            raise CaaError(f"{acts.label}: behavior '{behavior}' has no training pairs")
        x_pos = acts.values[pos.row.to_numpy()].astype(np.float64)  # [pairs, d_model]
        x_neg = acts.values[neg.row.to_numpy()].astype(np.float64)
        diffs = x_pos - x_neg
        if method == "pca" and train.sum() < 2:
            raise CaaError(
                f"{acts.label}: --method pca: '{behavior}' has {int(train.sum())} training pair; the "
                "principal component of one difference is any direction: use --method mean, or more pairs"
            )
        vector = _direction(
            diffs[train], method, f"{acts.label}: --method pca: '{behavior}' at layer {layer}"
        )
        if not np.linalg.norm(vector) > 0:
            raise CaaError(
                f"{acts.label}: the vector of '{behavior}' at layer {layer} has zero norm: the positive "
                "and negative activations of its training pairs are identical"
            )
        residual = np.linalg.norm(np.concatenate([x_pos[train], x_neg[train]]), axis=1).mean()
        test = ~train
        rows.append(
            {
                "behavior": behavior,
                "layer": int(layer),
                "method": method,
                "n_train": int(train.sum()),
                "n_test": int(test.sum()),
                "vector_norm": float(np.linalg.norm(vector)),
                "mean_residual_norm": float(residual),
                "norm_ratio": float(np.linalg.norm(vector) / residual) if residual > 0 else None,
                "pair_consistency": consistency(diffs[train]),
                "test_accuracy": float((diffs[test] @ vector > 0).mean()) if test.any() else None,
                "test_auc": auc(x_pos[test] @ vector, x_neg[test] @ vector) if test.any() else None,
                "vector": vector.astype(np.float32),
            }
        )
    frame = pd.DataFrame(rows)
    frame["cos_prev_layer"], frame["cos_next_layer"] = _adjacent_cosines(frame)
    return frame


def _aligned(group: pd.DataFrame, path: Path, behavior: str, layer: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Positive and negative rows of one (behavior, layer), in the same pair order; every pair
    must have both."""
    group = group.assign(row=group.index)
    pos = group[group.side == "positive"].set_index("pair_id")
    neg = group[group.side == "negative"].set_index("pair_id")
    for have, lack in ((pos, neg), (neg, pos)):
        alone = have.index.difference(lack.index)
        if len(alone):
            side = "negative" if have is pos else "positive"
            raise CaaError(
                f"{path}: '{behavior}' at layer {layer}: pair '{alone[0]}' has no {side} row "
                f"({len(alone)} of {len(have)} pairs lack one)"
            )
    common = pos.index.sort_values()
    return pos.loc[common], neg.loc[common]


def _direction(diffs: np.ndarray, method: str, what: str) -> np.ndarray:
    mean = diffs.mean(axis=0)  # [d_model], float64
    if method == "mean":
        return mean
    centred = diffs - mean
    _, spread, vt = np.linalg.svd(centred, full_matrices=False)
    if not spread[0] > 1e-9 * max(float(np.abs(diffs).max()), 1e-30):
        raise CaaError(
            f"{what}: the training differences are all equal, so they have no principal component "
            "(any direction would do): use --method mean"
        )
    unit = vt[0]
    along = float(mean @ unit)
    if along < 0:
        unit, along = -unit, -along
    return along * unit


def consistency(diffs: np.ndarray) -> float | None:
    """Mean cosine between each pair's difference and the mean difference: how consistently the pairs
    point one way (Braun et al. 2025 found it predicts whether steering works). None when no pair has
    a non-zero difference."""
    mean = diffs.mean(0)
    norms = np.linalg.norm(diffs, axis=1) * np.linalg.norm(mean)
    ok = norms > 0
    return float((diffs[ok] @ mean / norms[ok]).mean()) if ok.any() else None


def auc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting one half."""
    scores = np.concatenate([pos_scores, neg_scores])
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    n_pos, n_neg = len(pos_scores), len(neg_scores)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else float("nan")


def _adjacent_cosines(frame: pd.DataFrame) -> tuple[list[float | None], list[float | None]]:
    prev: list[float | None] = [None] * len(frame)
    nxt: list[float | None] = [None] * len(frame)
    for _, group in frame.groupby("behavior"):
        idx = group.sort_values("layer").index.tolist()
        for a, b in pairwise(idx):
            c = _cosine(frame.at[a, "vector"].astype(np.float64), frame.at[b, "vector"].astype(np.float64))
            nxt[a], prev[b] = c, c
    return prev, nxt


def vector_set(frame: pd.DataFrame, acts: Activations, options: dict[str, Any] | None = None) -> VectorSet:
    """The rows of :func:`vector_rows` as a :class:`VectorSet`, with the provenance of the
    activations they came from (model, prompt format, and the training pairs, which the sweep
    refuses to score)."""
    trained = acts.keys.pair_id[acts.keys.split == "train"]
    meta = make_meta(
        VECTORS,
        options or {},
        inputs={str(p): p for p in acts.paths},
        model=acts.meta.get("model"),
        prompt=acts.meta.get("prompt"),
        layers=sorted(int(x) for x in set(frame.layer)),
        behaviors=sorted(set(frame.behavior)),
        train_pair_ids=sorted(set(trained)),
    )
    values = np.stack(frame.vector.to_list()).astype(np.float32)  # [rows, d_model]
    return VectorSet(frame.drop(columns="vector").reset_index(drop=True), values, meta)


IN_MEMORY = Path("<vectors in memory>")


@dataclass
class VectorSet:
    """Steering vectors: one row per (behavior, layer) with its diagnostics, and the vectors.

    ``caa.compute_vectors`` makes one; :meth:`read` reads ``vectors.parquet`` and :meth:`save`
    writes it; :meth:`tensor` hands one vector to torch. Errors name :attr:`path` (the file, or
    ``<vectors in memory>``)."""

    frame: pd.DataFrame  # one row per (behavior, layer), diagnostics included
    values: np.ndarray  # [rows, d_model] float32
    meta: dict[str, Any]
    path: Path = IN_MEMORY

    @classmethod
    def read(cls, path: Path | str) -> VectorSet:
        """Read ``vectors.parquet``; refuses non-finite or zero vectors, and two vectors of one behavior
        at one layer."""
        path = Path(path)
        art = read_artifact(path, VECTORS)
        values = vectors_of(art.table, "vector")
        frame = art.table.drop_columns("vector").to_pandas()
        if not len(frame):
            raise InputError(path, "has no vectors")
        for bad, problem in (
            (~np.isfinite(values).all(axis=1), "has NaN or infinite values"),
            (~(np.abs(values).max(axis=1) > 0), "is all zeros (steering with it changes nothing)"),
        ):
            if bad.any():
                r = frame.iloc[int(np.flatnonzero(bad)[0])]
                raise InputError(
                    path, f"the vector of '{r.behavior}' at layer {r.layer} {problem}", field="vector"
                )
        repeated = frame.duplicated(["behavior", "layer"]).to_numpy()
        if repeated.any():
            row = int(repeated.argmax())
            r = frame.iloc[row]
            raise InputError(
                path,
                f"a second vector of '{r.behavior}' at layer {r.layer}: which one to use is ambiguous",
                where=f"row {row}",
                field="layer",
            )
        return cls(frame, values, art.meta, path)

    def save(self, path: Path | str) -> Path:
        """Write ``vectors.parquet`` atomically, with its provenance."""
        d_model = self.values.shape[1]
        columns = {f.name: self.frame[f.name].tolist() for f in VECTORS.fields}
        columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(self.values.reshape(-1)), d_model)
        write_artifact(pa.table(columns), Path(path), VECTORS, self.meta)
        return Path(path)

    def tensor(
        self, behavior: str | None = None, layer: int | None = None, scale: str = "raw"
    ) -> torch.Tensor:
        """One vector as a float32 torch tensor [d_model]; ``behavior`` may be left out when the set
        holds one, ``layer`` when the behavior has one; ``scale`` as in :meth:`vector`."""
        name = self.pick(behavior)
        if layer is None:
            have = self.layers(name)
            if len(have) != 1:
                raise CaaError(f"{self.path}: '{name}' has layers {', '.join(map(str, have))}: pass layer=")
            layer = have[0]
        return torch.from_numpy(self.vector(name, layer, scale).copy())

    def behaviors(self) -> list[str]:
        return sorted(set(self.frame.behavior))

    def layers(self, behavior: str) -> list[int]:
        behavior = same_name(behavior)
        return sorted(self.frame[self.frame.behavior == behavior].layer.astype(int))

    def require(self, behavior: str, layers: Sequence[int] | None = None) -> list[int]:
        """The layers to use for ``behavior`` (default: all it has), with an error for any it lacks."""
        behavior = same_name(behavior)
        if behavior not in set(self.frame.behavior):
            raise CaaError(f"{self.path}: no behavior '{behavior}'; it has {', '.join(self.behaviors())}")
        have = self.layers(behavior)
        missing = sorted(set(layers or []) - set(have))
        if missing:
            raise CaaError(
                f"{self.path}: no vector for '{behavior}' at layer {missing[0]}; "
                f"it has layers {', '.join(map(str, have))}"
            )
        return list(layers) if layers else have

    def pick(self, behavior: str | None) -> str:
        """``behavior`` (in NFC, as names are kept) if the file has it; without one, the file's only
        behavior."""
        names = self.behaviors()
        if behavior is None:
            if len(names) != 1:
                raise CaaError(
                    f"{self.path} holds several behaviors ({', '.join(names)}): pick one with --behavior"
                )
            return names[0]
        behavior = same_name(behavior)
        self.require(behavior)
        return behavior

    def absurd_norms(
        self, behaviors: Sequence[str] | None = None, layers: Sequence[int] | None = None
    ) -> list[str]:
        """One warning line per vector (of ``behaviors`` at ``layers``, default all) whose norm is
        more than ABSURD_RATIO times its layer's mean residual norm: steering with it drowns the
        residual stream, and every output is noise rather than the behavior."""
        frame = self.frame
        norms = np.linalg.norm(self.values.astype(np.float64), axis=1)
        residual = frame.mean_residual_norm.to_numpy(dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = norms / residual
        bad = ~(ratio <= ABSURD_RATIO)  # a zero residual norm counts as absurd
        bad &= ~np.isnan(residual)  # an unknown one (imported vectors, null) leaves nothing to judge
        if behaviors is not None:
            bad &= frame.behavior.isin([same_name(b) for b in behaviors]).to_numpy()
        if layers is not None:
            bad &= frame.layer.isin(list(layers)).to_numpy()
        return [
            f"{self.path}: the vector of '{frame.behavior.iloc[i]}' at layer {frame.layer.iloc[i]} has norm "
            f"{norms[i]:.3g}, {ratio[i]:.3g} times the layer's mean residual norm ({residual[i]:.3g}): "
            "steering with it swamps the model"
            for i in np.flatnonzero(bad)
        ]

    def vector(self, behavior: str, layer: int, scale: str = "raw") -> np.ndarray:
        """The vector of one behavior at one layer, with an error naming what the file has.

        ``scale``: ``raw``, the vector as computed (the paper's: a multiplier times it); ``residual``,
        the vector's direction at the length of the layer's mean residual-stream norm, so that a
        multiplier of 0.5 is half a typical residual at any layer and in any model."""
        if scale not in SCALES:
            raise CaaError(f"--scale '{scale}': use one of {', '.join(SCALES)}")
        behavior = same_name(behavior)
        if behavior not in set(self.frame.behavior):
            raise CaaError(f"{self.path}: no behavior '{behavior}'; it has {', '.join(self.behaviors())}")
        hit = np.flatnonzero(
            (self.frame.behavior == behavior).to_numpy() & (self.frame.layer == layer).to_numpy()
        )
        if not len(hit):
            have = ", ".join(map(str, self.layers(behavior)))
            raise CaaError(f"{self.path}: no vector for '{behavior}' at layer {layer}; it has layers {have}")
        value = self.values[hit[0]]
        if scale == "raw":
            return value
        residual = self.frame.mean_residual_norm.iloc[hit[0]]
        if residual is None or not np.isfinite(residual) or residual <= 0:
            raise CaaError(
                f"{self.path}: --scale residual: the vector of '{behavior}' at layer {layer} has no "
                "mean residual norm (field 'mean_residual_norm'; imported vectors have none): use --scale raw"
            )
        unit = value.astype(np.float64) / np.linalg.norm(value.astype(np.float64))
        return (unit * float(residual)).astype(np.float32)
