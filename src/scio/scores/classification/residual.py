"""Residual: norm of the features outside their principal subspace (ViM without logits)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.classification.vim import vim_origin, vim_residual_basis
from scio.scores.core.base import ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.core.head import HeadMixin
from scio.scores.core.validation import ParamRange, param_ranges

__all__ = ["Residual", "residual_conformity"]

_F64 = torch.float64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return _F64 if dtype == _F64 else torch.float32


def residual_conformity(features: Tensor, origin: Tensor, basis: Tensor) -> Tensor:
    """Residual conformity ``(n,)``: ``-||(x - u) R||`` (compute dtype: float32, float64
    for float64 features)."""
    x = features.reshape(features.shape[0], -1).to(_compute_dtype(features.dtype))
    return -((x - origin.to(x)) @ basis.to(x)).norm(dim=1)


class Residual(HeadMixin, StreamingCalibration, BaseScoreClassif):
    """Feature residual (Wang et al., "ViM: Out-Of-Distribution with Virtual-logit
    Matching", CVPR 2022, its "Residual" baseline; OpenOOD's ``residual`` postprocessor).

    Idea: in-distribution features lie close to a low-dimensional principal subspace of the
    training features; the norm of their component outside it (the residual) is small, OoD
    features have a larger one. This is :class:`~scio.scores.ViM`'s feature-space signal
    alone, without the logits.

    Formula: features ``x`` are the input of the linear head ``z = W x + b``; the origin is
    moved to ``u = -pinv(W) b``. With ``M = (1/N) Σ_i (x_i - u)(x_i - u)ᵀ`` over
    calibration and ``R`` the eigenvectors of its ``d - D`` smallest eigenvalues,
    ``conformity = -||(x - u) R||``, identical for every class. Labels are not used.

    Args:
        dim: ``D``, size of the principal space, ``0 < D < d`` (default 512, OpenOOD's,
            meant for ``d = 2048`` features; ``D ≥ d`` raises ``ValueError`` at fit, e.g. use
            ``d // 2`` for smaller features).
        head: the head's module name (``None``: discovered, see
            :class:`~scio.scores.core.head.HeadMixin`).
        act_norm: unused (the head input is read raw).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: calibration accumulates the float64 ``(d, d)`` moment (one ``d × d`` product per
    batch, ``O(d²)`` memory), then one ``pinv(W)`` and one ``d × d`` ``eigh``. Inference: one
    forward and one ``(n × d)·(d × (d - D))`` product. Fitted state: ``origin`` ``u``,
    ``residual_basis`` ``R`` and ``eigenvalues`` (decreasing).
    """

    dim: int = 512

    _param_ranges = param_ranges(dim=ParamRange.interval(1, closed="left", integer=True))
    _fitted_attrs: ClassVar[tuple[str, ...]] = (
        *HeadMixin._head_fitted_attrs,
        "origin",
        "residual_basis",
        "eigenvalues",
    )

    def _calib_start(self) -> None:
        super()._calib_start()
        self.__dict__.pop("_origin_calib", None)  # left over by a failed fit

    def _calib_update(self, batch: CalibBatch) -> None:
        features = self.head_features(batch).to(_F64)
        origin = self.__dict__.get("_origin_calib")
        if origin is None:
            bias = self.head_bias
            weight = self.head_weight.detach()
            origin = vim_origin(weight, None if bias is None else bias.detach())
            self._origin_calib = origin
        centred = features - origin.to(features.device)
        self._state.add("count", torch.tensor(float(len(features)), dtype=_F64))
        self._state.add("moment", centred.T @ centred)

    def _calib_end(self) -> None:
        origin: Tensor = self.__dict__.pop("_origin_calib")
        moment = self._state.sum("moment") / self._state.sum("count")
        d = moment.shape[0]
        if not 0 < self.dim < d:
            msg = (
                f"`dim` must satisfy 0 < dim < d = {d} (the head's input size) so that a "
                f"residual space remains (got dim={self.dim})"
            )
            raise ParamError(msg)
        eigenvalues, basis = vim_residual_basis(moment, self.dim)
        self.origin: Tensor = origin
        self.residual_basis: Tensor = basis
        self.eigenvalues: Tensor = eigenvalues

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, features = self.head_forward(inputs)
        conformity = residual_conformity(features, self.origin, self.residual_basis)
        return out, conformity.to(out.dtype)
