"""GMM: per-layer Gaussian mixtures with a tied covariance, fit on calibration features."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch

__all__ = ["GMM", "fit_tied_gmm", "gmm_log_density", "kmeans", "layer_feature", "pca_basis"]

_F64 = torch.float64
FEATURE_TYPES = ("flat", "mean", "stat")
#: scikit-learn's ``GaussianMixture`` defaults (used by OpenOOD).
MAX_ITER, TOL, REG_COVAR = 100, 1e-3, 1e-6
#: scikit-learn's ``KMeans`` defaults (the mixture's initialisation).
KMEANS_MAX_ITER, KMEANS_TOL = 300, 1e-4


def layer_feature(activation: Tensor, feature_type: str) -> Tensor:
    """``(n, d)`` feature of a ``(n, C, ...)`` activation: ``"flat"`` (every value),
    ``"mean"`` (per-channel mean) or ``"stat"`` (per-channel mean, then per-channel unbiased
    variance; the mean alone when the activation has one value per channel)."""
    if feature_type == "flat":
        return activation.reshape(activation.shape[0], -1)
    per_channel = activation.reshape(*activation.shape[:2], -1)
    mean = per_channel.mean(dim=2)
    if feature_type == "mean" or per_channel.shape[2] == 1:
        return mean
    return torch.cat([mean, per_channel.var(dim=2)], dim=1)


def pca_basis(features: Tensor, dim: int) -> Tensor:
    """``(d, dim)`` float64 principal directions of ``features`` (decreasing variance), each
    signed so that its largest-magnitude entry is positive. Uses the ``d × d`` covariance, or
    the ``n × n`` Gram matrix when ``n < d``."""
    x = features.to(_F64)
    centred = x - x.mean(dim=0)
    n, d = centred.shape
    if d <= n:
        _, vectors = torch.linalg.eigh(centred.T @ centred)
        basis = vectors.flip(1)[:, :dim]
    else:
        values, vectors = torch.linalg.eigh(centred @ centred.T)
        top = vectors.flip(1)[:, :dim]
        basis = centred.T @ top / values.flip(0)[:dim].clamp(min=1e-300).sqrt()
    pivot = basis.abs().argmax(dim=0)
    signs = basis.gather(0, pivot[None]).sign()
    return basis * torch.where(signs == 0, 1.0, signs)


def _sq_distances(x: Tensor, centres: Tensor) -> Tensor:
    return torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """Greedy k-means++ seeding: the indices of the ``k`` seeds. The draws are
    scikit-learn's (``2 + ⌊ln k⌋`` candidates per seed, the same calls to the same
    ``RandomState``), so a seed gives the seeds of ``KMeans(random_state=seed)``."""
    n = len(x)
    trials = 2 + int(np.log(k))
    norms = (x**2).sum(axis=1)

    def sq_distances(rows: np.ndarray) -> np.ndarray:
        return np.maximum(-2 * x[rows] @ x.T + norms[rows, None] + norms[None], 0)

    seeds = [int(rng.choice(n, p=np.ones(n) / n))]
    closest = sq_distances(np.array(seeds))[0]
    for _ in range(1, k):
        draws = rng.uniform(size=trials) * closest.sum()
        candidates = np.minimum(np.searchsorted(np.cumsum(closest), draws), n - 1)
        to_candidates = np.minimum(closest, sq_distances(candidates))
        best = int(np.argmin(to_candidates.sum(axis=1)))
        closest = to_candidates[best]
        seeds.append(int(candidates[best]))
    return np.array(seeds)


def kmeans(x: Tensor, k: int, seed: int) -> Tensor:
    """Lloyd's k-means (on the centred float64 data) from a k-means++ seeding: the ``(n,)``
    cluster labels, as scikit-learn's ``KMeans(n_init=1, random_state=seed)`` up to
    rounding. Stops when the labels no longer change or the squared centre shift is at most
    ``1e-4`` times the mean feature variance; an emptied cluster is moved to the point
    farthest from its centre."""
    x = x - x.mean(dim=0)
    seeds = _kmeans_plus_plus(x.numpy(), k, np.random.RandomState(seed))
    centres = x[torch.from_numpy(seeds)]
    tol = KMEANS_TOL * float(x.var(dim=0, unbiased=False).mean())
    labels = _sq_distances(x, centres).argmin(dim=1)
    for _ in range(KMEANS_MAX_ITER):
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        new = sums / counts.clamp(min=1)[:, None].to(x.dtype)
        for empty in (counts == 0).nonzero().flatten().tolist():
            far = int(((x - new[labels]) ** 2).sum(dim=1).argmax())
            new[empty] = x[far]
            labels[far] = empty
        shift = float(((new - centres) ** 2).sum())
        centres = new
        new_labels = _sq_distances(x, centres).argmin(dim=1)
        if torch.equal(new_labels, labels) or shift <= tol:
            labels = new_labels
            break
        labels = new_labels
    return labels


def _m_step(x: Tensor, resp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights, means, precision_cholesky)`` of a tied-covariance mixture."""
    n, d = x.shape
    nk = resp.sum(dim=0) + 10 * torch.finfo(_F64).eps
    means = resp.T @ x / nk[:, None]
    covariance = (x.T @ x - (nk[:, None] * means).T @ means) / nk.sum()
    covariance = (covariance + covariance.T) / 2 + REG_COVAR * torch.eye(d, dtype=_F64)
    chol = torch.linalg.cholesky(covariance)
    eye = torch.eye(d, dtype=_F64)
    precision_chol = torch.linalg.solve_triangular(chol, eye, upper=False).T
    return nk / n, means, precision_chol


def gmm_log_density(
    x: Tensor, log_weights: Tensor, means: Tensor, precision_chol: Tensor
) -> Tensor:
    """``log Σ_k w_k exp(-½ (x - μ_k)ᵀ P (x - μ_k))`` ``(n,)`` with ``P = L Lᵀ`` (no
    normalising constant: a tied covariance shares it), computed in ``x``'s dtype."""
    chol = precision_chol.to(x)
    projected = (x @ chol)[:, None, :] - (means.to(x) @ chol)[None]
    maha = (projected**2).sum(dim=2)
    return torch.logsumexp(log_weights.to(x) - maha / 2, dim=1)


def fit_tied_gmm(x: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """EM for a ``k``-component tied-covariance mixture on float64 ``x``, from a k-means
    partition (scikit-learn's ``GaussianMixture(covariance_type="tied", random_state=seed)``:
    the same k-means seeding, ``reg_covar = 1e-6``, at most 100 iterations, stop when the
    mean log-likelihood moves less than ``1e-3``). Returns ``(log_weights, means,
    precision_cholesky)``."""
    n, d = x.shape
    labels = kmeans(x, k, seed)
    resp = torch.zeros(n, k, dtype=_F64).scatter_(1, labels[:, None], 1.0)
    weights, means, chol = _m_step(x, resp)
    lower_bound = -math.inf
    for _ in range(MAX_ITER):
        log_det = chol.diagonal().log().sum()
        maha = (((x @ chol)[:, None, :] - (means @ chol)[None]) ** 2).sum(dim=2)
        weighted = weights.log() - (d * math.log(2 * math.pi) + maha) / 2 + log_det
        log_norm = torch.logsumexp(weighted, dim=1)
        weights, means, chol = _m_step(x, (weighted - log_norm[:, None]).exp())
        previous, lower_bound = lower_bound, float(log_norm.mean())
        if abs(lower_bound - previous) < TOL:
            break
    return weights.log(), means, chol


class GMM(StreamingCalibration, BaseScoreClassif):
    """GMM (OpenOOD's ``gmm`` postprocessor): a Gaussian mixture with a tied covariance per
    recorded layer, the conformity being a weighted sum of log-densities (the class-agnostic
    mixture counterpart of Lee et al.'s Mahalanobis ensemble, NeurIPS 2018).

    Idea: in-distribution features of a layer are well described by a few Gaussian clusters
    sharing one covariance; OoD features have a low likelihood under that mixture.

    Formula: layer ``l``'s activation becomes a feature ``φ_l(a)`` (``feature_type_list``),
    projected as ``y = φ_l(a) V_l`` (``V_l``: identity, or the top principal directions of
    the calibration features for ``"pca_K"``, uncentred as in OpenOOD). A mixture with
    ``num_clusters_list[l]`` components, weights ``w_k``, means ``μ_k`` and tied precision
    ``P`` is fit by EM on the calibration ``y`` (k-means initialisation, as scikit-learn's
    ``GaussianMixture``). Conformity ``Σ_l α_l log Σ_k w_k exp(-½ (y - μ_k)ᵀ P (y - μ_k))``,
    identical for every class.

    Args:
        num_clusters_list: components per layer (default ``(3, 1, 50)``).
        feature_type_list: per layer ``"flat"``, ``"mean"`` or ``"stat"`` (default
            ``("stat", "mean", "flat")``; see :func:`layer_feature`).
        alpha_list: weight ``α_l`` of each layer (default ``(0, 0, 1)``). Layers of weight 0
            contribute nothing and are not fit.
        reduce_dim_list: per layer ``"none"`` or ``"pca_K"`` (default
            ``("none", "none", "pca_50")``).
        seed: seed of the k-means initialisation (OpenOOD's ``random_state=0``).
        act_norm: normalisation of the activations before ``φ``.
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Every list holds one entry per recorded layer, in firing order (OpenOOD's defaults are
    for three recorded layers, e.g. the stem and the first two blocks of a ResNet). Unlike
    OpenOOD's ``log(Σ ... + 1e-45)``, the log-density is computed stably (no floor at
    ``log 1e-45`` for far inputs), and ``"stat"`` of a ``(n, C, 1, 1)`` layer is its mean
    (OpenOOD's unbiased variance of one value is NaN). OpenOOD's ``"capca"``/``"lda"``
    reductions are not offered.

    Cost: calibration keeps the ``φ_l`` features of every weighted layer (float32, float64
    for float64 networks), then per layer a PCA (one ``d × d`` or ``n × n`` eigendecomposition)
    and EM (``O(n · K · d'²)`` per iteration, at most 100) in float64. Inference: the
    recorded forward, one ``(n × d)·(d × d')`` projection and ``n · K`` Mahalanobis
    distances per layer.
    """

    num_clusters_list: tuple[int, ...] | list[int] = (3, 1, 50)
    feature_type_list: tuple[str, ...] | list[str] = ("stat", "mean", "flat")
    alpha_list: tuple[float, ...] | list[float] = (0.0, 0.0, 1.0)
    reduce_dim_list: tuple[str, ...] | list[str] = ("none", "none", "pca_50")
    seed: int = 0

    _extension_params = BaseScoreClassif._extension_params | {"seed"}
    _fitted_attrs: ClassVar[tuple[str, ...]] = (
        "transforms",
        "log_weights",
        "means",
        "precision_chols",
    )

    def _check_param_value(self, name: str, value: Any) -> None:
        _validate(name, value)
        super()._check_param_value(name, value)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        names = ("num_clusters_list", "feature_type_list", "alpha_list", "reduce_dim_list")
        for name in (*names, "seed"):
            _validate(name, getattr(self, name))
        lengths = {name: len(getattr(self, name)) for name in names}
        if len(set(lengths.values())) != 1:
            msg = (
                "`num_clusters_list`, `feature_type_list`, `alpha_list` and `reduce_dim_list` "
                f"must have one entry per recorded layer, so the same length (got {lengths})"
            )
            raise ParamError(msg)

    def _features(self, activations: tuple[Tensor, ...]) -> list[Tensor | None]:
        """``φ_l`` of each weighted layer (``None`` for the others), in the compute dtype."""
        n_layers = len(self.alpha_list)
        if len(activations) != n_layers:
            msg = (
                f"GMM has {n_layers} entries per parameter list (one per layer) but its "
                f"Recorder records {len(activations)} layers: record as many layers, or give "
                "lists of that length"
            )
            raise ValueError(msg)
        normalized = self.normalize(activations)
        features: list[Tensor | None] = []
        for activation, feature_type, alpha in zip(
            normalized, self.feature_type_list, self.alpha_list, strict=True
        ):
            if alpha == 0:
                features.append(None)
                continue
            dtype = _F64 if activation.dtype == _F64 else torch.float32
            features.append(layer_feature(activation.to(dtype), feature_type))
        return features

    def _calib_update(self, batch: CalibBatch) -> None:
        for i, feature in enumerate(self._features(batch.activations)):
            if feature is not None:
                self._state.append(f"layer{i}", feature)

    def _calib_end(self) -> None:
        transforms: list[Tensor | None] = []
        log_weights: list[Tensor | None] = []
        means: list[Tensor | None] = []
        chols: list[Tensor | None] = []
        for i, (k, reduce) in enumerate(zip(self.num_clusters_list, self.reduce_dim_list)):
            if f"layer{i}" not in self._state:
                for fitted in (transforms, log_weights, means, chols):
                    fitted.append(None)
                continue
            x = self._state.cat(f"layer{i}").to(_F64)
            device = x.device
            x = x.cpu()  # EM is sequential and small: float64 on the CPU
            n, d = x.shape
            transform = None
            if reduce != "none":
                dim = int(reduce.split("_")[1])
                if dim > min(n, d):
                    msg = (
                        f"`reduce_dim_list[{i}]` = {reduce!r} keeps more components than "
                        f"min(n_calib, d) = min({n}, {d}) of the layer's features"
                    )
                    raise ValueError(msg)
                transform = pca_basis(x, dim)
                x = x @ transform
            if k > n:
                msg = f"`num_clusters_list[{i}]` = {k} exceeds the {n} calibration samples"
                raise ValueError(msg)
            lw, mu, chol = fit_tied_gmm(x, k, self.seed)
            transforms.append(None if transform is None else transform.to(device))
            log_weights.append(lw.to(device))
            means.append(mu.to(device))
            chols.append(chol.to(device))
        self.transforms: tuple[Tensor | None, ...] = tuple(transforms)
        self.log_weights: tuple[Tensor | None, ...] = tuple(log_weights)
        self.means: tuple[Tensor | None, ...] = tuple(means)
        self.precision_chols: tuple[Tensor | None, ...] = tuple(chols)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        features = self._features(tuple(self.rnet.activations.values()))
        total: Tensor | None = None
        for i, feature in enumerate(features):
            if feature is None:
                continue
            transform = self.transforms[i]
            y = feature if transform is None else feature @ transform.to(feature)
            lw, mu, chol = self.log_weights[i], self.means[i], self.precision_chols[i]
            assert lw is not None and mu is not None and chol is not None
            term = float(self.alpha_list[i]) * gmm_log_density(y, lw, mu, chol)
            total = term if total is None else total + term
        if total is None:  # every weight is 0
            total = out.new_zeros(out.shape[0], dtype=torch.float32)
        return out, total.to(out.dtype)


def _validate(name: str, value: Any) -> None:
    """Raise ``ParamError`` naming ``name`` unless ``value`` is valid for it."""
    if name not in (
        "num_clusters_list", "feature_type_list", "alpha_list", "reduce_dim_list", "seed"
    ):  # fmt: skip
        return
    if name == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            msg = f"`seed` must be an integer (got {value!r})"
            raise ParamError(msg)
        return
    if not isinstance(value, (tuple, list)) or not value:
        msg = f"`{name}` must be a non-empty list with one entry per recorded layer (got {value!r})"
        raise ParamError(msg)
    for entry in value:
        if name == "num_clusters_list":
            ok = isinstance(entry, int) and not isinstance(entry, bool) and entry >= 1
            expected = "positive integers"
        elif name == "alpha_list":
            ok = isinstance(entry, (int, float)) and not isinstance(entry, bool)
            ok = ok and math.isfinite(entry)
            expected = "finite numbers"
        elif name == "feature_type_list":
            ok = entry in FEATURE_TYPES
            expected = f"one of {FEATURE_TYPES}"
        else:
            ok = isinstance(entry, str) and (entry == "none" or _pca_dim(entry) is not None)
            expected = "'none' or 'pca_K' with K a positive integer"
        if not ok:
            msg = f"`{name}` entries must be {expected} (got {entry!r} in {value!r})"
            raise ParamError(msg)


def _pca_dim(entry: str) -> int | None:
    kind, _, dim = entry.partition("_")
    if kind != "pca" or not dim.isdigit() or int(dim) < 1:
        return None
    return int(dim)
