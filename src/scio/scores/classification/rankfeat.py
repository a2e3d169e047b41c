"""RankFeat: remove the rank-1 component of two late feature maps, fuse the logits."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration, ParamError

__all__ = ["RankFeat", "gram_rank1", "power_iteration_rank1", "remove_rank1"]

#: Power iterations of ``accelerate=True`` (OpenOOD's value).
POWER_ITERATIONS = 20
#: Seed of the (fixed) start vectors of the power iteration.
POWER_SEED = 0
#: Squarings of the Gram matrix of the exact rank-1 term (see :func:`gram_rank1`).
SQUARINGS = 10


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _l2normalize(v: Tensor) -> Tensor:
    return v / (v.norm(dim=2, keepdim=True) + 1e-10)


def power_iteration_rank1(matrices: Tensor, iterations: int = POWER_ITERATIONS) -> Tensor:
    """``σ₁ u₁ v₁ᵀ`` of each ``(C, L)`` matrix of ``(n, C, L)``, by ``iterations`` power
    iterations from the same seeded start vectors for every matrix and call."""
    n, c, length = matrices.shape
    generator = torch.Generator().manual_seed(POWER_SEED)
    u0 = torch.randn(c, generator=generator, dtype=torch.float64)
    v0 = torch.randn(length, generator=generator, dtype=torch.float64)
    u = u0.to(matrices).reshape(1, 1, c).repeat(n, 1, 1)
    v = v0.to(matrices).reshape(1, length, 1).repeat(n, 1, 1)
    for _ in range(iterations):
        v = _l2normalize(u.bmm(matrices)).transpose(1, 2)
        u = _l2normalize(matrices.bmm(v).transpose(1, 2))
    sigma = u.bmm(matrices).bmm(v)
    return sigma * u.transpose(1, 2).bmm(v.transpose(1, 2))


def gram_rank1(matrices: Tensor, squarings: int = SQUARINGS) -> Tensor:
    """``σ₁ u₁ v₁ᵀ`` of each ``(C, L)`` matrix ``X`` of ``(n, C, L)``: ``P X`` (``C ≤ L``) or
    ``X P`` with ``P = u₁ u₁ᵀ`` (or ``v₁ v₁ᵀ``) the projector on the top eigenvector of the
    smaller Gram matrix ``G``, obtained as ``G^(2^s) / trace`` by ``s`` trace-normalised
    squarings: the other eigen-directions shrink by ``(σ₂/σ₁)^(2^(s+1))`` (below ``1e-9``
    for ``σ₁/σ₂ ≥ 1.01`` with the default ``s = 10``). Only batched matrix products: no
    per-matrix LAPACK call (a batched ``eigh``/``svd`` is 10 to 100 times slower on a
    busy multi-threaded CPU). A zero matrix gives 0."""
    left = matrices.shape[1] <= matrices.shape[2]
    transposed = matrices.transpose(1, 2)
    projector = matrices.bmm(transposed) if left else transposed.bmm(matrices)
    for step in range(squarings + 1):
        trace = projector.diagonal(dim1=1, dim2=2).sum(dim=1)
        projector = projector / torch.where(trace > 0, trace, 1)[:, None, None]
        if step < squarings:
            projector = projector.bmm(projector)
    return projector.bmm(matrices) if left else matrices.bmm(projector)


def remove_rank1(feature_map: Tensor, *, accelerate: bool = False) -> Tensor:
    """``X - σ₁ u₁ v₁ᵀ`` per sample, ``X`` the ``(C, H·W)`` matrix of a ``(n, C, ...)`` map
    (exact, :func:`gram_rank1`, or :func:`power_iteration_rank1` with ``accelerate``).
    Computed in float32 (float64 stays float64), returned in the map's dtype and shape; a
    map with a non-finite value becomes NaN (the others are unaffected)."""
    n, c = feature_map.shape[:2]
    x = feature_map.reshape(n, c, -1).to(_work_dtype(feature_map.dtype))
    finite = x.isfinite().all(dim=2).all(dim=1)[:, None, None]  # LAPACK fails on NaN/inf
    safe = torch.where(finite, x, 0)
    top = power_iteration_rank1(safe) if accelerate else gram_rank1(safe)
    top = torch.where(finite, top, math.nan)  # a non-finite map gives a NaN map
    return (x - top).reshape(feature_map.shape).to(feature_map.dtype)


def _keep(_: Tensor) -> None:
    """Post-processor leaving a recorded activation unchanged."""


class RankFeat(NoCalibration, BaseScoreClassif):
    """RankFeat (Song et al., "RankFeat: Rank-1 Feature Removal for Out-of-distribution
    Detection", NeurIPS 2022; OpenOOD's ``rankfeat`` postprocessor).

    Idea: the largest singular value of a late feature map (seen as a ``C × HW`` matrix) is
    much larger for OoD inputs, and its rank-1 component drives their over-confident
    predictions; removing it lowers the OoD logits far more than the in-distribution ones.

    Formula: record two feature maps ``A`` (earlier, e.g. the third block) and ``B`` (later,
    e.g. the last block) in this firing order. ``z_B`` = logits with ``B`` replaced by
    ``B - σ₁ u₁ v₁ᵀ`` (everything downstream recomputed), ``z_A`` = logits with ``A``
    replaced likewise and ``B`` recomputed from it. Conformity
    ``T · logsumexp(((z_A + z_B) / 2) / T)``, identical for every class.

    Args:
        temperature: ``T > 0`` (default 1).
        accelerate: approximate ``σ₁ u₁ v₁ᵀ`` by 20 power iterations (seeded start vectors:
            deterministic) instead of computing it exactly (OpenOOD: a batched SVD; here
            the projector on the top eigenvector of the smaller Gram matrix, the same term,
            see :func:`gram_rank1`).
        act_norm: unused (activations are read raw).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    ``out`` is the plain network output. Both recorded layers must output ``(n, C, ...)``
    maps (a spatial extent of at least one).

    Cost: nothing at calibration. Inference: one recorded forward, per map one Gram matrix
    of size ``m = min(C, HW)`` and 10 batched ``m × m`` squarings (20 matrix-vector
    products with ``accelerate``), and two reruns of the network downstream of ``A``
    (:meth:`scio.recorder.Recorder.shaped_forward`; two full forwards when the network cannot
    be split there).
    """

    temperature: float = 1.0
    accelerate: bool = False

    def _check_param_value(self, name: str, value: Any) -> None:
        _validate(name, value)
        super()._check_param_value(name, value)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        _validate("temperature", self.temperature)
        _validate("accelerate", self.accelerate)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        rnet = self.rnet
        out = rnet(inputs)
        activations = tuple(rnet.activations.values())
        _check_maps(activations)
        accelerate = self.accelerate

        def shaped(a: Tensor) -> Tensor:
            return remove_rank1(a, accelerate=accelerate)

        logits_a = rnet.shaped_forward(inputs, activations, [shaped, _keep])
        logits_b = rnet.shaped_forward(inputs, activations, [_keep, shaped])
        dtype = _work_dtype(out.dtype)
        fused = (logits_a.to(dtype) + logits_b.to(dtype)) / 2
        t = self.temperature
        return out, (t * torch.logsumexp(fused / t, dim=1)).to(out.dtype)


def _check_maps(activations: tuple[Tensor, ...]) -> None:
    if len(activations) != 2:
        msg = (
            "RankFeat needs exactly two recorded layers, an earlier and a later feature map "
            f"(e.g. the last two blocks), but its Recorder records {len(activations)}: call "
            "`rnet.record(...)` with two layers before `fit`"
        )
        raise ValueError(msg)
    for i, activation in enumerate(activations):
        if not isinstance(activation, Tensor) or activation.ndim < 3:
            shape = tuple(getattr(activation, "shape", ()))
            msg = (
                "RankFeat needs feature maps of shape (n, C, H, W) (or (n, C, L)), but recorded "
                f"layer #{i} outputs shape {shape}"
            )
            raise ValueError(msg)


def _validate(name: str, value: Any) -> None:
    """Raise ``ParamError`` naming ``name`` unless ``value`` is valid for it."""
    if name == "temperature":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not 0 < value < math.inf:
            msg = f"`temperature` must be a finite number > 0 (got {value!r})"
            raise ParamError(msg)
    elif name == "accelerate" and not isinstance(value, bool):
        msg = f"`accelerate` must be a bool (got {value!r})"
        raise ParamError(msg)
