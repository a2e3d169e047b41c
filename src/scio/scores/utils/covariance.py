"""Covariance math of Gaussian feature models: precision, whitening, Mahalanobis distances.

Pure tensor math behind the Mahalanobis scores (Lee et al., NeurIPS 2018; Ren et al., 2021):
a float64 eigendecomposition that keeps the numerically non-null part of a covariance, the
whitening matrix ``W`` (``W Wᵀ`` = inverse or pseudo-inverse), the plain precision and
distances of the reference API, and the memory check run before a layer's float64
covariance statistics are allocated.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import Tensor

__all__ = [
    "check_covariance_memory",
    "compute_dtype",
    "mahalanobis_distances",
    "precision_matrix",
    "whitening_matrix",
]

_F64 = torch.float64
#: Float64 ``d × d`` matrices alive at the end of calibration (running ``Σ z zᵀ``, covariance,
#: its symmetrised copy, eigenvectors, whitening), per covariance.
_MATRICES_PER_COVARIANCE = 5
#: Above this estimate (bytes), calibration warns before allocating.
_WARN_BYTES = 2 * 2**30


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return _F64 if dtype == _F64 else torch.float32


def _eigh(cov: Tensor, raw_scale: float = 0.0) -> tuple[Tensor, Tensor, Tensor] | None:
    """Eigen-decomposition of a symmetric float64 matrix, with its numerically kept part.

    Returns ``(eigenvalues, eigenvectors, keep)`` where ``keep`` marks the eigenvalues above
    ``d · eps · max(λ_max, raw_scale)`` (``raw_scale`` accounts for the cancellation error
    of a covariance derived from raw second moments), or ``None`` if ``cov`` is not finite.
    """
    if not bool(cov.isfinite().all()):
        return None
    cov = (cov + cov.T) / 2
    eigvals, eigvecs = torch.linalg.eigh(cov)
    d = cov.shape[0]
    top = float(eigvals.abs().max()) if d else 0.0
    tol = max(d, 1) * torch.finfo(_F64).eps * max(top, raw_scale)
    return eigvals, eigvecs, eigvals > tol


def whitening_matrix(cov: Tensor, raw_scale: float, where: str) -> Tensor:
    """``W`` (``d × r``, float64) with ``W Wᵀ`` the inverse (or pseudo-inverse) of ``cov``.

    ``cov`` is a float64 covariance; eigenvalues up to ``d · eps · max(λ_max, raw_scale)``
    are dropped (``raw_scale``: scale of the raw second moments it was derived from).
    Warns (naming ``where``) when ``cov`` is singular (pseudo-inverse used) or not finite
    (NaN matrix returned).
    """
    d = cov.shape[0]
    decomposition = _eigh(cov, raw_scale)
    if decomposition is None:
        warnings.warn(
            f"Non-finite {where}: its Mahalanobis distances are NaN (conformity -inf). "
            "Calibration needs at least two samples with finite features",
            UserWarning,
            stacklevel=2,
        )
        return torch.full((d, d), math.nan, dtype=_F64, device=cov.device)
    eigvals, eigvecs, keep = decomposition
    rank = int(keep.sum())
    if rank < d:
        warnings.warn(
            f"Singular {where} (numerical rank {rank} < dimension {d}): using its pseudo-inverse",
            UserWarning,
            stacklevel=2,
        )
    return eigvecs[:, keep] * eigvals[keep].rsqrt()


def mahalanobis_distances(
    samples: Tensor, mu: Tensor, precision: Tensor, *, product: bool = True
) -> Tensor:
    """Squared Mahalanobis distances ``(x - μ)ᵀ P (x - μ)``.

    Args:
        samples: ``(n, d)`` samples.
        mu: ``(m, d)`` means. With ``product=False`` it broadcasts against ``samples``
            (e.g. ``(n, d)``: one mean per sample, or ``(d,)``).
        precision: ``(d, d)`` precision matrix (only its symmetric part matters).
        product: ``True``: distance of every sample to every mean, ``(n, m)``, computed
            with matrix products (no ``(n, m, d)`` tensor). ``False``: row-wise distance
            of each sample to its own mean, ``(n,)``.

    Returns:
        Distances with the dtype of ``samples`` (half precision computed in float32).
        NaN means give NaN distances.
    """
    dtype = samples.dtype
    cdtype = compute_dtype(dtype)
    x = samples.to(cdtype)
    means = mu.to(device=x.device, dtype=cdtype)
    prec = precision.to(device=x.device, dtype=cdtype)
    prec = (prec + prec.T) / 2
    if not product:
        diff = x - means
        return ((diff @ prec) * diff).sum(dim=-1).to(dtype)
    # Shift both sides by a common point (differences unchanged, less cancellation).
    shift = means.nanmean(dim=0).nan_to_num(0.0)
    x, means = x - shift, means - shift
    x_prec = x @ prec
    sq_x = (x_prec * x).sum(dim=1, keepdim=True)
    sq_mu = ((means @ prec) * means).sum(dim=1)
    return (sq_x - 2 * (x_prec @ means.T) + sq_mu).to(dtype)


def precision_matrix(residues: Tensor) -> Tensor:
    """Inverse of the (unbiased, ``N - 1``) covariance of ``residues`` ``(N, d)``.

    Computed in float64 and returned with the dtype of ``residues``. As in the reference,
    a singular (numerical rank ``< d``) or non-finite covariance gives an all-NaN
    ``(d, d)`` matrix; the scores themselves fall back to the pseudo-inverse instead
    (:func:`whitening_matrix`).
    """
    dtype = residues.dtype if residues.is_floating_point() else torch.float32
    flat = residues.reshape(len(residues), -1).to(_F64)
    d = flat.shape[1]
    cov = flat.T.cov().reshape(d, d)
    decomposition = _eigh(cov)
    if decomposition is None or not bool(decomposition[2].all()):
        return torch.full((d, d), math.nan, dtype=dtype, device=residues.device)
    eigvals, eigvecs, _ = decomposition
    return ((eigvecs / eigvals) @ eigvecs.T).to(dtype)


def _available_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (physical RAM for the CPU), ``None`` if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_covariance_memory(
    score: str, layer: str, feats: Tensor, device: torch.device, *, n_covariances: int = 1
) -> None:
    """Raise ``MemoryError`` (more than the device has) or warn (over 2 GiB) before a layer's
    float64 covariance statistics are allocated, naming ``score``, the ``layer``, its size
    and the fix.

    Args:
        score: the score's name, for the message.
        layer: the layer's description, for the message.
        feats: ``(n, *shape)`` features of the layer (``d = prod(shape)``).
        device: where the statistics will live.
        n_covariances: ``d × d`` covariances kept per layer (2 with a background one).

    The warning has ``stacklevel=4``, for a call from a score's calibration step.
    """
    d = math.prod(feats.shape[1:])
    n_matrices = _MATRICES_PER_COVARIANCE * n_covariances
    estimate = d * d * 8 * n_matrices
    available = _available_bytes(device)
    if estimate <= _WARN_BYTES and (available is None or estimate <= available):
        return
    msg = (
        f"{score}: recorded layer {layer} has {d} features per sample "
        f"(flattened {tuple(feats.shape[1:])}); its float64 covariance statistics need about "
        f"{estimate / 2**30:.1f} GiB ({d}² · 8 bytes × {n_matrices} matrices) "
        f"and a {d} × {d} eigendecomposition. Fix: record a pooled layer "
        "instead (e.g. the global-average-pooling output), or pool this one (a module "
        "returning `a.mean(dim=(2, 3))`, or the Recorder's `activation_postproc` at "
        "inference), or record another (smaller) layer"
    )
    if available is not None and estimate > available:
        msg += f" (the {device.type} device has {available / 2**30:.1f} GiB)"
        raise MemoryError(msg)
    warnings.warn(msg, UserWarning, stacklevel=4)
