"""NCI: neural-collapse-inspired proximity to the predicted class's weight vector."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.core.head import HeadMixin

__all__ = ["NCI", "nci_conformity"]

_F64 = torch.float64
#: ``proximity`` values: the authors' projection, or the cosine (scio's former default).
PROXIMITIES = ("projection", "cosine")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return _F64 if dtype == _F64 else torch.float32


def nci_conformity(
    logits: Tensor,
    features: Tensor,
    weight: Tensor,
    center: Tensor,
    alpha: float,
    proximity: str = "projection",
) -> Tensor:
    """NCI conformity ``(n,)``: ``<x - μ_G, w_ŷ> / ||x - μ_G|| + α ||x||₁`` (``"projection"``)
    or ``cos(x - μ_G, w_ŷ) + α ||x||₁`` (``"cosine"``), in the compute dtype (float32,
    float64 for float64 features)."""
    dtype = _compute_dtype(features.dtype)
    x = features.reshape(features.shape[0], -1).to(dtype)
    pred = logits.argmax(dim=1)
    w = weight.detach().to(x)[pred]
    centred = x - center.to(x)
    tiny = torch.finfo(dtype).tiny
    norm = centred.norm(dim=1)
    if proximity == "cosine":
        norm = w.norm(dim=1) * norm
    elif proximity != "projection":
        msg = f"`proximity` must be one of {PROXIMITIES} (got {proximity!r})"
        raise ValueError(msg)
    proximity_value = (w * centred).sum(dim=1) / norm.clamp(min=tiny)
    if alpha == 0:
        return proximity_value
    return proximity_value + alpha * x.abs().sum(dim=1)


class NCI(HeadMixin, StreamingCalibration, BaseScoreClassif):
    """Neural-collapse-inspired detector (Liu & Qin, "Detecting Out-of-distribution through
    the Lens of Neural Collapse", 2023, arXiv:2311.01479; CVPR 2025).

    Idea: with neural collapse, in-distribution features centred at the global training
    mean align with the weight vector of their predicted class, OoD features do not. An
    optional filter adds the features' L1 norm (larger for in-distribution inputs).

    Formula: with ``x`` the head's input features, ``ŷ = argmax z``, ``w_ŷ`` the head's
    weight row of ``ŷ`` and ``μ_G`` the mean calibration feature,
    ``conformity = <x - μ_G, w_ŷ> / ||x - μ_G|| + α ||x||₁`` (the projection of the centred
    feature direction on ``w_ŷ``, the authors' and OpenOOD's formula), identical for every
    class. Labels are not used. With ``proximity="cosine"`` the projection is also divided
    by ``||w_ŷ||`` (the cosine: scio's former default, which ranks inputs differently
    when the weight rows have different norms).

    Args:
        alpha: weight of the L1-norm filter, ``α ≥ 0`` (default ``1e-4``, OpenOOD's; ``0``:
            the proximity alone). Used at inference only: changing it keeps the score fit.
        proximity: extension: ``"projection"`` (default, the authors') or ``"cosine"``.
            Used at inference only: changing it keeps the score fit.
        head: the head's module name (``None``: discovered, see
            :class:`~scio.scores.core.head.HeadMixin`). The logits ``z`` are recomputed from the
            head's input with its weight and bias (one ``d × C`` product): the network
            output for a discovered head, that layer's own output when ``head`` names a
            linear layer that is not the last one.

    Cost: calibration is a float64 running sum of the features (``O(d)`` memory).
    Inference: one forward, then ``O(n d)`` with the head's live weight. Fitted state:
    ``center`` (``μ_G``).
    """

    alpha: float = 1e-4
    proximity: str = "projection"

    _extension_params = BaseScoreClassif._extension_params | {"proximity"}

    _fitted_attrs: ClassVar[tuple[str, ...]] = (*HeadMixin._head_fitted_attrs, "center")

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        self._check_alpha()
        _check_proximity(self.proximity)

    def _check_alpha(self) -> None:
        alpha = self.alpha
        if not (isinstance(alpha, int | float) and 0 <= alpha < math.inf):
            msg = f"`alpha` must be a finite number >= 0 (got {alpha!r})"
            raise ValueError(msg)

    def _on_param_will_be_set(self, attr: str, future_val: object) -> None:
        if attr == "proximity":
            _check_proximity(future_val)
        if attr in ("alpha", "proximity"):  # used at inference only: the score stays fit
            return
        super()._on_param_will_be_set(attr, future_val)

    def _calib_update(self, batch: CalibBatch) -> None:
        features = self.head_features(batch).to(_F64)
        self._state.add("count", torch.tensor(float(len(features)), dtype=_F64))
        self._state.add("sum", features.sum(dim=0))

    def _calib_end(self) -> None:
        self.center: Tensor = self._state.sum("sum") / self._state.sum("count")

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        self._check_alpha()  # changing `alpha` keeps the score fit: checked here too
        out, features = self.head_forward(inputs)
        logits = self.head_logits(features)
        conformity = nci_conformity(
            logits, features, self.head_weight, self.center, self.alpha, self.proximity
        )
        return out, conformity.to(out.dtype)


def _check_proximity(value: object) -> None:
    if value not in PROXIMITIES:
        msg = f"`proximity` must be one of {PROXIMITIES} (got {value!r})"
        raise ParamError(msg)
