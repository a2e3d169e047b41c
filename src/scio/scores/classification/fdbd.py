"""fDBD: average distance to the decision boundaries, regularised by the feature norm."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.core.head import HeadMixin

__all__ = ["fDBD", "fdbd_conformity", "fdbd_inverse_gaps"]

_F64 = torch.float64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return _F64 if dtype == _F64 else torch.float32


def fdbd_inverse_gaps(weight: Tensor) -> Tensor:
    """``(C, C)`` float64 matrix ``1 / ||w_i - w_j||`` (rows of the head weight), ``0`` on
    the diagonal. Two identical rows give ``inf``."""
    w = weight.detach().to(_F64)
    gaps = torch.cdist(w, w)
    inverse = gaps.reciprocal()
    return inverse.fill_diagonal_(0.0)


def fdbd_conformity(
    logits: Tensor, features: Tensor, inverse_gaps: Tensor, center: Tensor
) -> Tensor:
    """fDBD conformity ``(n,)``: ``mean_{c ≠ ŷ} |z_ŷ - z_c| / ||w_ŷ - w_c||`` divided by
    ``||x - μ||`` (compute dtype: float32, float64 for float64 features)."""
    dtype = _compute_dtype(features.dtype)
    x = features.reshape(features.shape[0], -1).to(dtype)
    z = logits.to(dtype)
    n_classes = z.shape[1]
    pred = z.argmax(dim=1, keepdim=True)
    margins = (z.gather(1, pred) - z).abs()  # 0 at ŷ, whose inverse gap is 0 too
    distances = (margins * inverse_gaps.to(z)[pred.squeeze(1)]).sum(dim=1) / (n_classes - 1)
    return distances / (x - center.to(x)).norm(dim=1)


class fDBD(HeadMixin, StreamingCalibration, BaseScoreClassif):  # noqa: N801 (paper's name)
    """Fast decision-boundary-based detector (Liu & Qin, "Fast Decision Boundary based
    Out-of-Distribution Detector", ICML 2024).

    Idea: in-distribution features lie farther from the decision boundaries of the linear
    head than OoD features. The distance from a feature to the boundary between the
    predicted class and each other class has a closed form; averaged over the classes and
    divided by the distance to the mean training feature it needs no extra pass.

    Formula: with ``x`` the head's input features, ``z = W x + b``, ``ŷ = argmax z`` and
    ``μ`` the mean calibration feature,
    ``conformity = [1/(C-1) Σ_{c ≠ ŷ} |z_ŷ - z_c| / ||w_ŷ - w_c||] / ||x - μ||``
    (the bracket is the mean Euclidean distance from ``x`` to the hyperplanes
    ``z_ŷ = z_c``), identical for every class. Labels are not used.

    Args:
        head: the head's module name (``None``: discovered, see
            :class:`~scio.scores.core.head.HeadMixin`). The logits ``z`` are recomputed from the
            head's input with its weight and bias (one ``d × C`` product): the network
            output for a discovered head, that layer's own output when ``head`` names a
            linear layer that is not the last one.

    Cost: calibration is a float64 running sum of the features (``O(d)`` memory) and, at
    the end, the ``(C, C)`` inverse weight gaps. Inference: one forward, then ``O(n C)``.
    Fitted state: ``center`` (``μ``) and ``inverse_gaps``. Two identical weight rows give an
    infinite distance (degenerate head).
    """

    _fitted_attrs: ClassVar[tuple[str, ...]] = (
        *HeadMixin._head_fitted_attrs,
        "center",
        "inverse_gaps",
    )

    def _calib_update(self, batch: CalibBatch) -> None:
        features = self.head_features(batch).to(_F64)
        self._state.add("count", torch.tensor(float(len(features)), dtype=_F64))
        self._state.add("sum", features.sum(dim=0))

    def _calib_end(self) -> None:
        weight = self.head_weight
        if weight.shape[0] < 2:
            msg = (
                f"fDBD needs a head with at least 2 classes (head {self.head_name!r} has "
                f"{weight.shape[0]})"
            )
            raise ValueError(msg)
        self.center: Tensor = self._state.sum("sum") / self._state.sum("count")
        self.inverse_gaps: Tensor = fdbd_inverse_gaps(weight)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, features = self.head_forward(inputs)
        logits = self.head_logits(features)
        conformity = fdbd_conformity(logits, features, self.inverse_gaps, self.center)
        return out, conformity.to(out.dtype)
