"""OpenMax: Weibull-recalibrated logits with an explicit "unknown" class."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import elementwise
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch, validate_labels

__all__ = [
    "OpenMax",
    "fit_weibull",
    "mav_distances",
    "openmax_probabilities",
    "tail_distances",
]

_F64 = torch.float64
DISTANCES = ("euclidean", "cosine", "eucos")
#: ``readout`` values: the recalibrated class probabilities, or the unknown class's.
READOUTS = ("class", "unknown")
#: ``weibull`` values: the plain maximum-likelihood fit, or libMR's translated one.
WEIBULL_FITS = ("mle", "libmr")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _cosine_distance(a: Tensor, b: Tensor, *, paired: bool) -> Tensor:
    a = torch.nn.functional.normalize(a, dim=1)
    b = torch.nn.functional.normalize(b, dim=1)
    return 1 - ((a * b).sum(dim=1) if paired else a @ b.T)


def mav_distances(av: Tensor, mav: Tensor, kind: str, *, paired: bool = False) -> Tensor:
    """Distances between activation vectors ``(n, d)`` and mean activation vectors.

    ``paired``: ``mav`` is ``(n, d)`` and row ``i`` is compared with row ``i`` (``(n,)``);
    else ``mav`` is ``(C, d)`` and every pair is computed (``(n, C)``). ``kind``:
    ``"euclidean"`` ``||a - m||``, ``"cosine"`` ``1 - cos(a, m)``, ``"eucos"``
    ``||a - m|| / 200 + 1 - cos(a, m)`` (the combination of the authors' implementation).
    """
    if kind == "cosine":
        return _cosine_distance(av, mav, paired=paired)
    if paired:
        euclid = (av - mav).norm(dim=1)
    elif torch.compiler.is_exporting():  # cdist picks its algorithm by the batch size
        euclid = (av[:, None, :] - mav[None, :, :]).norm(dim=2)
    else:
        euclid = torch.cdist(av, mav)
    if kind == "euclidean":
        return euclid
    return euclid / 200 + _cosine_distance(av, mav, paired=paired)


def tail_distances(distances: Tensor, labels: Tensor, n_classes: int, tailsize: int) -> Tensor:
    """The ``tailsize`` largest ``distances`` of each class, as a NaN-padded ``(C, tailsize)``.

    Vectorised: a stable sort by class of the distances sorted decreasingly, then each
    sample's rank inside its class.
    """
    order = distances.argsort(descending=True, stable=True)
    order = order[labels[order].argsort(stable=True)]
    sorted_labels = labels[order]
    counts = torch.bincount(labels, minlength=n_classes)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(order), device=distances.device) - starts[sorted_labels]
    keep = rank < tailsize
    tail = torch.full(
        (n_classes, tailsize), torch.nan, dtype=distances.dtype, device=distances.device
    )
    tail[sorted_labels[keep], rank[keep]] = distances[order][keep]
    return tail


def fit_weibull(tail: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-likelihood two-parameter Weibull (location 0) of each row of ``tail``.

    ``tail`` is ``(C, t)`` float64, NaN-padded. Returns ``(shape κ, scale λ, fitted)``; rows
    with fewer than two distinct positive values cannot be fitted (``fitted`` False, κ and λ
    NaN). The shape solves the profile-likelihood equation
    ``sum x^κ ln x / sum x^κ - 1/κ - mean(ln x) = 0`` (increasing in κ, one root), for all
    rows at once with scipy's vectorised bracketing root finder; then
    ``λ = mean(x^κ)^(1/κ)``. Data are divided by their row maximum (scale invariance) so
    ``x^κ`` never overflows.
    """
    tail = np.asarray(tail, dtype=np.float64)
    valid = np.isfinite(tail) & (tail > 0)
    n_valid = valid.sum(axis=1)
    top = np.where(valid, tail, -np.inf).max(axis=1, initial=-np.inf)
    low = np.where(valid, tail, np.inf).min(axis=1, initial=np.inf)
    fitted = (n_valid >= 2) & (low < top)
    shape = np.full(len(tail), np.nan)
    scale = np.full(len(tail), np.nan)
    rows = np.flatnonzero(fitted)
    if len(rows) == 0:
        return shape, scale, fitted
    mask = valid[rows]
    log_u = np.where(mask, np.log(np.where(mask, tail[rows], 1.0) / top[rows, None]), 0.0)
    counts = n_valid[rows]
    mean_log = log_u.sum(axis=1) / counts

    def profile(k: np.ndarray, idx: np.ndarray) -> np.ndarray:
        lu = log_u[idx]
        w = np.where(mask[idx], np.exp(k[..., None] * lu), 0.0)
        return (w * lu).sum(axis=-1) / w.sum(axis=-1) - 1 / k - mean_log[idx]

    idx = np.arange(len(rows))
    bracket = elementwise.bracket_root(profile, np.ones(len(rows)), xmin=0.0, args=(idx,))
    root = elementwise.find_root(profile, bracket.bracket, args=(idx,))
    k = np.asarray(root.x, dtype=np.float64)
    ok = np.asarray(bracket.success & root.success) & np.isfinite(k) & (k > 0)
    moment = np.where(mask, np.exp(k[:, None] * log_u), 0.0).sum(axis=1) / counts
    shape[rows] = np.where(ok, k, np.nan)
    scale[rows] = np.where(ok, top[rows] * moment ** (1 / k), np.nan)
    fitted[rows] = ok
    return shape, scale, fitted


def openmax_probabilities(
    av: Tensor, distances: Tensor, shape: Tensor, scale: Tensor, fitted: Tensor, alpha: int
) -> Tensor:
    """OpenMax recalibration: ``(n, C + 1)`` probabilities, column 0 the unknown class.

    ``w_c = WeibullCDF(distances_c; κ_c, λ_c)`` (1 where ``fitted`` is False); the classes of
    rank ``i = 0 .. α-1`` by decreasing activation get ``ω_c = 1 - (α - i)/α · w_c`` (the
    others ``ω_c = 1``); ``v̂ = v ω``, ``v̂_0 = sum_c v_c (1 - ω_c)`` and the result is
    ``softmax([v̂_0, v̂])``.
    """
    n, n_classes = av.shape
    alpha = min(alpha, n_classes)
    cdf = -torch.expm1(-((distances / scale).clamp(min=0) ** shape))
    cdf = torch.where(fitted, cdf, torch.ones_like(cdf))
    ranked = av.topk(alpha, dim=1).indices
    rank_weights = torch.arange(alpha, 0, -1, dtype=av.dtype, device=av.device) / alpha
    weights = torch.zeros_like(av).scatter_(1, ranked, rank_weights.expand(n, alpha))
    moved = av * weights * cdf  # v_c (1 - ω_c)
    revised = torch.cat([moved.sum(dim=1, keepdim=True), av - moved], dim=1)
    return torch.softmax(revised, dim=1)


def _validate(attr: str, value: Any) -> None:
    """Raise ``ParamError`` (a ``ValueError``) naming ``attr`` if ``value`` is invalid."""
    if attr in ("tailsize", "alpha"):
        lowest = 2 if attr == "tailsize" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            msg = f"`{attr}` must be an integer >= {lowest} (got {value!r})"
            raise ParamError(msg)
    elif attr == "distance" and value not in DISTANCES:
        msg = f"`distance` must be one of {DISTANCES} (got {value!r})"
        raise ParamError(msg)
    elif attr == "readout" and value not in READOUTS:
        msg = f"`readout` must be one of {READOUTS} (got {value!r})"
        raise ParamError(msg)
    elif attr == "weibull" and value not in WEIBULL_FITS:
        msg = f"`weibull` must be one of {WEIBULL_FITS} (got {value!r})"
        raise ParamError(msg)


class OpenMax(StreamingCalibration, BaseScoreClassif):
    """OpenMax (Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016).

    Idea: model, per class, how far the activation vectors (logits) of correctly classified
    in-distribution inputs lie from the class's mean activation vector (MAV), with extreme
    value theory (a Weibull fit of the largest distances). At inference the top-``alpha``
    logits are shrunk by the probability that the input is an outlier of their class, and
    the removed mass becomes the logit of an extra "unknown" class.

    Formula: at calibration, for the correctly classified samples of each class ``c``
    (labels needed), ``μ_c`` = mean logit vector and ``(κ_c, λ_c)`` = maximum-likelihood
    Weibull (location 0) of the ``tailsize`` largest ``dist(v, μ_c)``. At inference, with
    ``v`` the logits and ``w_c = 1 - exp(-(dist(v, μ_c)/λ_c)^κ_c)``, the classes of rank
    ``i = 0 .. α-1`` (by decreasing ``v``) get ``ω_c = 1 - (α - i)/α · w_c``, others 1;
    ``v̂ = v ∘ ω``, ``v̂_0 = sum_c v_c (1 - ω_c)`` and ``P̂ = softmax([v̂_0, v̂])``.
    conformity ``c_j = P̂_j`` (``j = 1..C``, the recalibrated class probabilities: the
    predicted-class conformity is small when the unknown class or another class wins, the
    paper's rejection rule), or with ``readout="unknown"`` ``c_j = -P̂_0`` for every class
    (the negated probability of the unknown class: OpenOOD's and the other peers' read-out).
    The paper's Algorithm 2 prints the Weibull survival function and the ranks from 1; this
    follows the authors' released implementation (the CDF, the top class weighted 1), the
    only reading where farther inputs are less confident.

    Classes without a Weibull model (fewer than two correctly classified calibration samples
    with distinct distances, e.g. absent classes) get ``w_c = 1`` (every input is an outlier
    for them), with a ``UserWarning`` naming them (documented fallback).

    Args:
        tailsize: number of largest distances per class in the Weibull fit (``>= 2``,
            default 25; fewer when a class has fewer correct samples).
        alpha: number of top classes revised (``>= 1``, default 10; at most the number of
            classes is used).
        distance: ``"euclidean"`` (the paper's formula, default), ``"cosine"`` or
            ``"eucos"`` (``euclidean / 200 + cosine``, the authors' released code).
        readout: extension: ``"class"`` (default, ``P̂_j``) or ``"unknown"`` (``-P̂_0``).
            Changing it keeps the score fit.
        weibull: extension: ``"mle"`` (default: the maximum-likelihood Weibull of the tail
            distances, location 0) or ``"libmr"`` (the libMR library's ``FitHigh`` used by
            the authors and by OpenOOD: each class's tail is translated to start at 1,
            ``x - min(tail) + 1``, before the same fit, and inference distances are
            translated alike). OpenOOD's OpenMax is ``OpenMax(tailsize=20, alpha=3,
            weibull="libmr", readout="unknown")``.
        act_norm: unused (the activation vector is the network output).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: calibration keeps the logits of the correctly classified samples (``n × C``),
    then one vectorised Weibull fit for all classes on CPU (scipy, float64). Inference: one
    plain forward, one ``(n × C)·(C × C)`` distance computation and a top-``alpha``. Fitted
    state: ``mav`` (``C × C`` float64, NaN rows for classes without correct samples),
    ``weibull_shape`` and ``weibull_scale`` (``C`` float64, NaN without a model),
    ``weibull_fitted`` (``C`` bool) and ``weibull_shift`` (``C`` float64 translation of the
    distances, 0 with ``weibull="mle"``).
    """

    tailsize: int = 25
    alpha: int = 10
    distance: str = "euclidean"
    readout: str = "class"
    weibull: str = "mle"

    _extension_params = BaseScoreClassif._extension_params | {"readout", "weibull"}

    _fitted_attrs: ClassVar[tuple[str, ...]] = (
        "mav",
        "weibull_shape",
        "weibull_scale",
        "weibull_fitted",
        "weibull_shift",
    )

    def _check_param_value(self, name: str, value: Any) -> None:
        super()._check_param_value(name, value)  # before any is set (atomic `set_params`)
        _validate(name, value)

    def _on_param_will_be_set(self, attr: str, future_val: Any) -> None:
        if attr == "readout":  # a pure read-out: the score stays fit
            return
        super()._on_param_will_be_set(attr, future_val)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        for attr in ("tailsize", "alpha", "distance", "readout", "weibull"):
            _validate(attr, getattr(self, attr))

    def _calib_update(self, batch: CalibBatch) -> None:
        out = batch.out
        labels = validate_labels(batch.labels, len(batch), out.shape[1]).to(out.device)
        correct = out.argmax(dim=1) == labels
        self._state.append("av", out[correct].to(_F64))
        self._state.append("labels", labels[correct])

    def _calib_end(self) -> None:
        av, labels = self._state.cat("av"), self._state.cat("labels")
        n_classes = av.shape[1]
        counts = torch.bincount(labels, minlength=n_classes).to(_F64)
        sums = torch.zeros(n_classes, n_classes, dtype=_F64, device=av.device)
        sums.index_add_(0, labels, av)
        mav = sums / counts[:, None]  # NaN rows for classes without correct samples
        dist = mav_distances(av, mav[labels], self.distance, paired=True)
        tail = tail_distances(dist, labels, n_classes, self.tailsize)
        shift = torch.zeros(n_classes, dtype=_F64, device=av.device)
        if self.weibull == "libmr":  # libMR's FitHigh translates the tail to start at 1
            low = tail.nan_to_num(nan=torch.inf).amin(dim=1)
            shift = torch.where(low.isfinite(), 1 - low, shift)
            tail = tail + shift[:, None]
        shape, scale, fitted = fit_weibull(tail.cpu().numpy())
        missing = np.flatnonzero(~fitted).tolist()
        if missing:
            warnings.warn(
                f"OpenMax: class(es) {missing} have fewer than two correctly classified "
                "calibration samples with distinct distances to their mean: no Weibull model, "
                "every input is taken as an outlier for them (Weibull CDF = 1)",
                UserWarning,
                stacklevel=5,
            )
        device = av.device
        self.mav: Tensor = mav
        self.weibull_shape: Tensor = torch.from_numpy(shape).to(device)
        self.weibull_scale: Tensor = torch.from_numpy(scale).to(device)
        self.weibull_fitted: Tensor = torch.from_numpy(fitted).to(device)
        self.weibull_shift: Tensor = shift

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs, dont_record=True)
        work = _work_dtype(out.dtype)
        av = out.to(work)
        fitted = self.weibull_fitted.to(out.device)
        mav = self.mav.to(device=out.device, dtype=work).nan_to_num(0.0)
        distances = mav_distances(av, mav, self.distance)
        shift = self.__dict__.get("weibull_shift")  # absent from files saved before it
        if shift is not None:
            distances = distances + shift.to(device=out.device, dtype=work)
        shape = self.weibull_shape.to(device=out.device, dtype=work).nan_to_num(1.0)
        scale = self.weibull_scale.to(device=out.device, dtype=work).nan_to_num(1.0)
        probs = openmax_probabilities(av, distances, shape, scale, fitted, self.alpha)
        if self.readout == "unknown":
            return out, (-probs[:, 0]).to(out.dtype)
        return out, probs[:, 1:].to(out.dtype)
