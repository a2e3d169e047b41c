"""ViM: virtual-logit matching, the feature residual against a principal subspace."""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch, CalibState
from scio.scores.core.head import HeadMixin
from scio.scores.core.validation import ParamRange, param_ranges

__all__ = ["ViM", "vim_conformity", "vim_default_dim", "vim_origin", "vim_residual_basis"]

_F64 = torch.float64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return _F64 if dtype == _F64 else torch.float32


def vim_default_dim(d: int) -> int:
    """The paper's principal-space size ``D`` for features of dimension ``d``.

    ``d ≥ 1500`` (e.g. 2048, ResNet-50/BiT): 1000; ``d ≥ 768`` (ViT-B): 512; smaller
    features (e.g. 512, CIFAR ResNet-18): ``d // 2``.
    """
    if d >= 1500:
        return 1000
    if d >= 768:
        return 512
    return d // 2


def vim_origin(weight: Tensor, bias: Tensor | None) -> Tensor:
    """The new origin ``u = -pinv(W) b`` ``(d,)`` (float64): the point of feature space
    whose logits are all zero (``W u + b = 0``, least squares), ``0`` without a bias."""
    if bias is None:
        return torch.zeros(weight.shape[1], dtype=_F64, device=weight.device)
    return -(torch.linalg.pinv(weight.to(_F64)) @ bias.to(_F64))


def vim_residual_basis(moment: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the ``(d, d)`` second moment ``M`` of the centred features.

    Returns ``(eigenvalues, basis)``: every eigenvalue of ``M`` in decreasing order, and
    the ``(d, d - dim)`` orthonormal basis of the complement of the principal space (the
    eigenvectors of the ``d - dim`` smallest eigenvalues), both float64.
    """
    symmetric = (moment.to(_F64) + moment.to(_F64).T) / 2
    eigvals, eigvecs = torch.linalg.eigh(symmetric)  # ascending
    d = symmetric.shape[0]
    return eigvals.flip(0), eigvecs[:, : d - dim]


def vim_conformity(
    logits: Tensor, features: Tensor, origin: Tensor, basis: Tensor, alpha: float
) -> Tensor:
    """ViM conformity ``(n,)`` in the compute dtype of ``features``.

    With ``v = α ||(x - u) R||`` the virtual logit (``R`` the residual basis), the paper's
    OoD score is the softmax probability of the virtual class,
    ``p_v = exp(v) / (Σ_c exp(z_c) + exp(v))``; the conformity is ``log(1 - p_v) =
    logsumexp(z) - logsumexp([z, v])`` (same ranking, stable, ``≤ 0``).
    """
    dtype = _compute_dtype(features.dtype)
    x = features.reshape(features.shape[0], -1).to(dtype)
    z = logits.to(dtype)
    residual = ((x - origin.to(x)) @ basis.to(x)).norm(dim=1)
    virtual = (alpha * residual).unsqueeze(1)
    return torch.logsumexp(z, dim=1) - torch.logsumexp(torch.cat([z, virtual], dim=1), dim=1)


def _mean_residual(state: CalibState, basis: Tensor) -> float:
    """Weighted mean of the residual norms of the kept rows (products with ``R`` part by
    part, in bounded chunks: the kept rows are never joined)."""
    parts, weights = state.pop("residual_rows"), state.pop("residual_weight")
    if not sum(len(part) for part in parts):
        return 0.0
    r = basis.to(device=parts[0].device, dtype=parts[0].dtype)
    step = max(1, 2**22 // max(r.shape[1], 1))
    norms = torch.cat(
        [(part[i : i + step] @ r).norm(dim=1) for part in parts for i in range(0, len(part), step)]
    )
    weight = torch.cat(weights).to(norms.device)
    return float((norms.to(_F64) * weight).sum() / weight.sum())


class ViM(HeadMixin, StreamingCalibration, BaseScoreClassif):
    """Virtual-logit matching (Wang et al., "ViM: Out-Of-Distribution with Virtual-logit
    Matching", CVPR 2022).

    Idea: in-distribution features lie close to a low-dimensional principal subspace of the
    training features; the norm of the residual outside it, rescaled to the logits' range,
    is appended as the logit of a virtual OoD class, whose softmax probability is the OoD
    score. It combines a feature-space and a class-dependent logit-space signal.

    Formula: features ``x`` are the input of the linear head ``z = W x + b``; the origin is
    moved to ``u = -pinv(W) b``. With ``M = (1/N) Σ_i (x_i - u)(x_i - u)ᵀ`` over
    calibration, ``R`` the eigenvectors of its ``d - D`` smallest eigenvalues, the residual
    ``r(x) = ||(x - u) R||`` and the virtual logit ``v = α r(x)``,
    ``conformity = log(1 - p_v) = logsumexp(z) - logsumexp([z_1, …, z_C, v])`` (the
    paper's ``p_v = softmax([z, v])_v``, as a monotone log form: identical for every class).

    ``α = mean_i max_c z_ic / mean_i r(x_i)`` over calibration, as in the paper. The basis
    ``R`` is only known once the moment is complete, so the centred calibration features are
    kept (compute dtype) while they fit :attr:`residual_budget` values (``2**24``, 64 MiB in
    float32: e.g. 32k samples of ``d = 512``, 8k of ``d = 2048``), and ``mean_i r(x_i)`` is
    then exact. Beyond it, the kept rows are thinned to a deterministic uniform subsample
    (every ``s``-th sample of the stream, ``s`` the smallest power of two that fits the
    budget; the same rows for a tensor or a DataLoader fit) and the mean is estimated from
    at least ``budget / (2d)`` rows (relative standard error ``cv(r) / sqrt(rows)``, below
    0.3 % for ``d = 2048`` at a ``cv`` of 0.2). In a distributed fit each rank thins its own
    shard (rows weighted by their rank's stride), so past the budget the distributed ``α``
    equals the single-process one only within that statistical error.

    Args:
        dim: ``D``, size of the principal space, ``0 < D < d``. ``None``: the paper's rule
            (:func:`vim_default_dim`: 1000 if ``d ≥ 1500``, 512 if ``d ≥ 768``, else
            ``d // 2``). ``D ≥ d`` raises ``ValueError`` at fit.
        head: the head's module name (``None``: discovered, see
            :class:`~scio.scores.core.head.HeadMixin`). The logits ``z`` are recomputed from the
            head's input with its weight and bias (one ``d × C`` product): the network
            output for a discovered head, that layer's own output when ``head`` names a
            linear layer that is not the last one.

    Cost: calibration accumulates the float64 ``(d, d)`` moment (one ``d × d`` product per
    batch) and keeps at most the budgeted features, then one ``d × d`` ``eigh`` (excluded
    from the streaming cost), one ``pinv(W)`` and one product of the kept rows with ``R``.
    Inference: one forward and one ``(n × d)·(d × (d - D))`` product. Fitted state:
    ``origin`` ``u``, ``residual_basis`` ``R``, ``alpha`` and ``eigenvalues``.
    """

    dim: int | None = None

    #: Most feature values kept to compute the exact mean residual norm (see above).
    residual_budget: ClassVar[int] = 2**24

    _fitted_attrs: ClassVar[tuple[str, ...]] = (
        *HeadMixin._head_fitted_attrs,
        "origin",
        "residual_basis",
        "alpha",
        "eigenvalues",
    )

    _param_ranges = param_ranges(
        dim=ParamRange.interval(1, low_open=False, integer=True, optional=True)
    )

    def _calib_update(self, batch: CalibBatch) -> None:
        raw = self.head_features(batch)
        features = raw.reshape(len(raw), -1).to(_F64)
        origin = self.__dict__.get("_origin_calib")
        if origin is None:
            origin = self._origin_calib = vim_origin(self.head_weight.detach(), self._bias())
        centred = features - origin.to(features.device)
        state = self._state
        state.add("count", torch.tensor(float(len(features)), dtype=_F64))
        state.add("moment", centred.T @ centred)
        logits = self.head_logits(raw)
        state.add("max_logit", logits.to(_F64).amax(dim=1).sum())
        self._keep_residual_rows(centred, _compute_dtype(raw.dtype))

    def _keep_residual_rows(self, centred: Tensor, dtype: torch.dtype) -> None:
        """Keep every ``stride``-th sample of the stream (global positions), doubling the
        stride while the kept values exceed :attr:`residual_budget`. The stream position
        comes from the running count, the stride from the kept rows' weights (all equal)."""
        state = self._state
        seen = int(state.sum("count")) - len(centred)  # ``count`` already includes the batch
        stride = next((int(w[0]) for w in state.parts("residual_weight") if len(w)), 1)
        rows = centred[(-seen) % stride :: stride].to(dtype)  # multiples of stride only
        state.append("residual_rows", rows)
        state.append("residual_weight", rows.new_full((len(rows),), float(stride), dtype=_F64))
        max_rows = max(1, self.residual_budget // max(centred.shape[1], 1))
        rows_parts, weight_parts = state.parts("residual_rows"), state.parts("residual_weight")
        while state.n_rows("residual_weight") > max_rows:
            # the kept rows sit at positions 0, s, 2s, ...: keep 0, 2s, ... (even ranks), part
            # by part so that the kept rows are never joined
            kept_rows, kept_weight, at = [], [], 0
            for part_rows, part_weight in zip(rows_parts, weight_parts, strict=True):
                first = at % 2
                at += len(part_rows)
                kept_rows.append(part_rows[first::2].clone())
                kept_weight.append(part_weight[first::2] * 2)
            rows_parts[:], weight_parts[:] = kept_rows, kept_weight

    def _bias(self) -> Tensor | None:
        bias = self.head_bias
        return None if bias is None else bias.detach()

    def _calib_end(self) -> None:
        state = self._state
        origin: Tensor = self.__dict__.pop("_origin_calib")
        n = float(state.sum("count"))
        moment = state.sum("moment") / n
        d = moment.shape[0]
        dim = vim_default_dim(d) if self.dim is None else self.dim
        if not 0 < dim < d:
            msg = (
                f"`dim` must satisfy 0 < dim < d = {d} (the head's input size) so that a "
                f"residual space remains (got dim={dim}"
                + (", from the default rule)" if self.dim is None else ")")
            )
            raise ValueError(msg)
        eigvals, basis = vim_residual_basis(moment, dim)
        mean_max_logit = float(state.sum("max_logit")) / n
        mean_residual = _mean_residual(state, basis)
        if mean_residual <= 0 or not math.isfinite(mean_residual):
            warnings.warn(
                f"ViM: the calibration features have no residual outside the {dim}-dimensional "
                "principal space (rank ≤ dim): alpha set to 1. Use a smaller `dim`",
                UserWarning,
                stacklevel=2,
            )
            alpha = 1.0
        else:
            alpha = mean_max_logit / mean_residual
        self.origin: Tensor = origin
        self.residual_basis: Tensor = basis
        self.eigenvalues: Tensor = eigvals
        self.alpha: float = alpha

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, features = self.head_forward(inputs)
        logits = self.head_logits(features)
        conformity = vim_conformity(logits, features, self.origin, self.residual_basis, self.alpha)
        return out, conformity.to(out.dtype)
