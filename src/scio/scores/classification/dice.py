"""DICE: sparsify the classifier head by the mean contribution of each weight."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from scio.scores.classification.ash import shaped_readout, work_dtype
from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.core.head import HeadMixin
from scio.scores.core.shaping import check_readout

__all__ = ["DICE", "dice_mask"]

_F64 = torch.float64


def dice_mask(contributions: Tensor, p: float) -> Tensor:
    """Boolean mask of the ``k = round(m · (100 - p) / 100)`` (at least 1) largest of the
    ``m`` entries of ``contributions`` (``(C, d)``, the matrix ``W ⊙ mean feature``)."""
    flat = contributions.flatten()
    k = max(round(flat.numel() * (100 - p) / 100), 1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[flat.topk(k).indices] = True
    return mask.view_as(contributions)


def _check_p(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"`p` must be a float in [0, 100) (got {value!r})"
        raise ParamError(msg)
    if math.isnan(value) or not 0 <= value < 100:
        msg = f"`p` must lie in [0, 100) (got {value!r})"
        raise ParamError(msg)


class DICE(HeadMixin, StreamingCalibration, BaseScoreClassif):
    """Directed sparsification (Sun & Li, "DICE: Leveraging Sparsification for
    Out-of-Distribution Detection", ECCV 2022).

    Idea: a class logit sums many weight × feature contributions, most of them small and
    noisy; OoD inputs draw on these unimportant contributions. Keeping only the weights
    whose contribution is large on in-distribution data lowers the OoD outputs more than the
    in-distribution ones.

    Formula: with ``h̄`` the mean head input (penultimate features) over calibration, the
    contribution matrix ``V = W ⊙ h̄`` (``V_cj = W_cj h̄_j``), the mask ``M`` keeps the
    ``k = round((1 - p/100) · C · d)`` largest entries of ``V`` (the top ``100 - p`` %);
    conformity = the ``readout`` of ``(M ⊙ W) h + b`` (energy in the paper).

    Args:
        p: sparsity percentage, ``0 <= p < 100`` (default 90, as in the paper's CIFAR
            experiments).
        readout: how the sparsified logits are read, see :mod:`scio.scores.core.shaping`
            (``"energy"`` default, ``"softmax"``, ``"logit"``, ``"msp"``).
        head: module name of the linear head (``None``: discovered after the recorded
            layer, see :class:`~scio.scores.core.head.HeadMixin`).
        act_norm: unused (the head input is read raw).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    ``out`` is the plain network output. The head's weights are never modified: the mask
    is applied on the fly (``W ⊙ M`` is a new tensor at every call), so the score follows
    later changes of the weights with the mask of calibration.

    Cost: calibration reads the tapped head input of the shared forward and keeps a float64
    running sum (``d`` values); the mask is one top-``k`` over ``C · d`` values. Inference:
    one forward, one ``C × d`` masking and one extra head product. Fitted state: ``mask``
    (``C × d`` bool) and ``feature_mean`` (``d`` float64). Half precision is computed in
    float32 and cast back.
    """

    p: float = 90.0
    readout: str = "energy"

    _fitted_attrs: ClassVar[tuple[str, ...]] = (
        *HeadMixin._head_fitted_attrs,
        "feature_mean",
        "mask",
    )

    def _check_param_value(self, name: str, value: Any) -> None:
        super()._check_param_value(name, value)  # before any is set (atomic `set_params`)
        if name == "p":
            _check_p(value)
        elif name == "readout":
            check_readout(value)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        _check_p(self.p)
        check_readout(self.readout)

    def _calib_update(self, batch: CalibBatch) -> None:
        features = self.head_features(batch).to(_F64)
        self._state.add("feature_sum", features.sum(dim=0))
        self._state.add("count", torch.tensor(len(features), dtype=_F64))

    def _calib_end(self) -> None:
        mean = self._state.sum("feature_sum") / self._state.sum("count")
        weight = self.head_weight.detach().to(device=mean.device, dtype=_F64)
        self.feature_mean: Tensor = mean
        self.mask: Tensor = dice_mask(weight * mean, self.p)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, features = self.head_forward(inputs)
        work = features.to(work_dtype(features.dtype))
        weight = self.head_weight.to(work.dtype) * self.mask.to(features.device)
        return out, shaped_readout(self, out, work, weight)
