"""SCALE: rescale the penultimate features by their top-percentile sum ratio."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from scio.scores.classification.ash import (
    check_percentile,
    shaped_readout,
    sum_ratio,
    top_sums,
    work_dtype,
)
from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration
from scio.scores.core.head import HeadMixin
from scio.scores.core.shaping import check_readout

__all__ = ["SCALE", "scale_shape"]


def scale_shape(features: Tensor, percentile: float) -> Tensor:
    """SCALE of ``(n, d)`` features: ``h · exp(s1 / s2)`` with ``s1`` the row sum and ``s2``
    the sum of the ``K = d - round(d · percentile / 100)`` largest values (nothing pruned)."""
    _, _, s1, s2 = top_sums(features, percentile)
    return features * sum_ratio(s1, s2).exp()[:, None]


class SCALE(HeadMixin, NoCalibration, BaseScoreClassif):
    """SCALE (Xu et al., "Scaling for Training Time and Post-hoc Out-of-distribution
    Detection Enhancement", ICLR 2024).

    Idea: ASH's gain comes from its rescaling, not its pruning (which costs in-distribution
    accuracy): scaling every feature of a sample by the same ASH-S factor keeps the
    prediction unchanged and separates the energies of in- and out-of-distribution inputs.

    Formula: with ``h`` the head input (``d`` values), ``s1 = sum(h)`` and ``s2`` the sum of
    its ``K = d - round(d · percentile/100)`` largest values, ``h' = h · exp(s1/s2)``;
    conformity = the ``readout`` of ``W h' + b`` (energy in the paper).

    Args:
        percentile: ``0 < percentile < 100`` (default 65; the paper tunes it per dataset,
            e.g. 85 on ImageNet).
        readout: how the shaped logits are read, see :mod:`scio.scores.core.shaping`
            (``"energy"`` default, ``"softmax"``, ``"logit"``, ``"msp"``).
        head: module name of the linear head (``None``: discovered after the recorded
            layer, see :class:`~scio.scores.core.head.HeadMixin`).
        act_norm: unused (the head input is read raw).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    ``out`` is the plain network output. The paper assumes non-negative features.

    Cost: calibration only finds the head (one probe forward on two inputs). Inference:
    one forward (the head input is tapped), a per-sample top-``K`` and one extra head
    product. Half precision is computed in float32 and cast back.
    """

    percentile: float = 65.0
    readout: str = "energy"

    _fitted_attrs: ClassVar[tuple[str, ...]] = HeadMixin._head_fitted_attrs

    def _check_param_value(self, name: str, value: Any) -> None:
        super()._check_param_value(name, value)  # before any is set (atomic `set_params`)
        if name == "percentile":
            check_percentile(value)
        elif name == "readout":
            check_readout(value)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        check_percentile(self.percentile)
        check_readout(self.readout)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, features = self.head_forward(inputs)
        shaped = scale_shape(features.to(work_dtype(features.dtype)), self.percentile)
        return out, shaped_readout(self, out, shaped)
