"""Relation: summed similarity to the calibration samples in a neural relation graph."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.core.validation import ParamRange, param_ranges

__all__ = ["Relation", "relation_conformity", "relation_unit"]

_F64 = torch.float64
#: Relations at or below this value are dropped (the authors' and OpenOOD's cut-off).
THRESHOLD = 0.03
#: Elements of one ``(n, block)`` relation matrix.
_BLOCK_ELEMENTS = 2**22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return _F64 if dtype == _F64 else torch.float32


def relation_unit(features: Tensor) -> Tensor:
    """Rows divided by ``sqrt(||x||² + 1e-10)`` (compute dtype)."""
    x = features.reshape(features.shape[0], -1).to(_compute_dtype(features.dtype))
    return x / (x.square().sum(dim=1, keepdim=True) + 1e-10).sqrt()


def relation_conformity(
    features: Tensor, probs: Tensor, bank_features: Tensor, bank_probs: Tensor, power: float
) -> Tensor:
    """Relation conformity ``(n,)``: ``Σ_j r_j^power [r_j > 0.03]`` over the bank, with
    ``r_j = max(<x, x_j>, 0) · <p, p_j>`` for unit features ``x`` and softmax vectors ``p``
    (computed by blocks of bank rows, in the dtype of ``features``)."""
    x, p = features, probs.to(features.dtype)
    total = x.new_zeros(x.shape[0])
    if torch.compiler.is_exporting():  # one block: the batch size stays symbolic
        step = max(1, len(bank_features))
    else:
        step = max(1, _BLOCK_ELEMENTS // max(len(x), 1))
    for i in range(0, len(bank_features), step):
        relation = (x @ bank_features[i : i + step].to(x).T).clamp(min=0)
        relation = relation * (p @ bank_probs[i : i + step].to(x).T)
        kept = relation > THRESHOLD
        if power != 1:
            relation = relation.pow(power)
        total = total + torch.where(kept, relation, 0).sum(dim=1)
    return total


class Relation(StreamingCalibration, BaseScoreClassif):
    """Neural relation graph (Kim et al., "Neural Relation Graph: A Unified Framework for
    Identifying Label Noise and Outlier Data", NeurIPS 2023; OpenOOD's ``relation``).

    Idea: samples are the nodes of a graph whose edge weights combine feature similarity and
    agreement of the predicted class distributions. An in-distribution input is strongly
    connected to many calibration samples (same kind of features, same predicted class); an
    outlier has few or weak edges. The OoD score is the node's summed edge weight.

    Formula: with ``x`` the features (recorded layers, flattened and concatenated,
    ``act_norm`` applied) divided by ``sqrt(||x||² + 1e-10)`` and ``p = softmax(z)`` the
    network's class probabilities, the relation to calibration sample ``j`` is
    ``r_j = max(<x, x_j>, 0) · <p, p_j>`` and
    ``conformity = Σ_j r_j^pow · [r_j > 0.03]``, identical for every class (the sign of
    ``r_j`` is always positive here). Labels are not used.

    Args:
        pow: the kernel's exponent ``> 0`` (default 1, OpenOOD's; its sweep uses 1 to 8).
            Used at inference only: changing it keeps the score fit.
        act_norm: normalisation applied to the recorded activations before the unit scaling.
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: calibration keeps the unit features and probabilities of every calibration
    sample (``N × (d + C)``, float32, float64 for float64 inputs), the whole graph as in the
    paper. Inference: one forward, then ``(n × d)·(d × N)`` and ``(n × C)·(C × N)`` products
    by blocks of the bank (``O(n N (d + C))``, bounded memory). Fitted state:
    ``bank_features`` ``(N, d)`` and ``bank_probs`` ``(N, C)``.
    """

    pow: float = 1

    _param_ranges = param_ranges(pow=ParamRange.interval(0, math.inf))

    _fitted_attrs: ClassVar[tuple[str, ...]] = ("bank_features", "bank_probs")

    def _on_param_will_be_set(self, attr: str, future_val: Any) -> None:
        if attr == "pow":  # used at inference only: the score stays fit
            return
        super()._on_param_will_be_set(attr, future_val)

    def _calib_update(self, batch: CalibBatch) -> None:
        (features,) = self.normalize(batch.activations, concatenate=True)
        x = relation_unit(features)
        self._state.append("features", x)
        self._state.append("probs", torch.softmax(batch.out.to(x.dtype), dim=1))

    def _calib_end(self) -> None:
        self.bank_features: Tensor = self._state.cat("features")
        self.bank_probs: Tensor = self._state.cat("probs")

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        (features,) = self.activations(concatenate=True)
        x = relation_unit(features)
        probs = torch.softmax(out.to(x.dtype), dim=1)
        conformity = relation_conformity(
            x, probs, self.bank_features, self.bank_probs, float(self.pow)
        )
        return out, conformity.to(out.dtype)
