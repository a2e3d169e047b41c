"""AdaSCALE: SCALE with a per-sample percentile set by the features' sensitivity to a small
input perturbation."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from scio.scores.classification.ash import sum_ratio, work_dtype
from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.core.head import HeadMixin
from scio.scores.core.input_grad import (
    DEFAULT_MAX_BATCH,
    by_chunks,
    check_max_batch,
    frozen_parameters,
)
from scio.scores.utils import batched_grad

__all__ = [
    "AdaScale",
    "adascale_factor",
    "adascale_perturb",
    "adascale_statistic",
    "ecdf_percentile",
]

VARIANTS = ("a", "l")
#: Step added to the perturbed input elements (OpenOOD's fixed value).
STEP = 0.5


def adascale_perturb(inputs: Tensor, grad: Tensor, o: float) -> Tensor:
    """``x + 0.5 · sign(g) · m``: ``m`` selects, per sample, the ``int(o · numel)`` input
    elements with the *smallest* ``|g|`` (the least sensitive ones)."""
    n = len(inputs)
    flat = grad.reshape(n, -1)
    n_pixels = int(flat.shape[1] * o)
    if n_pixels == 0:
        return inputs
    rows = flat.abs().topk(n_pixels, dim=1, largest=False).indices
    step = torch.zeros_like(flat).scatter_(1, rows, flat.gather(1, rows).sign() * STEP)
    return inputs + step.reshape(inputs.shape)


def top_count(d: int, percent: float) -> int:
    """``int(d · percent / 100)`` features (at least 1)."""
    return max(int(d * percent / 100), 1)


def adascale_statistic(
    features: Tensor, perturbed: Tensor, k1: float, k2: float, lmbda: float
) -> Tensor:
    """``Q' = Σ_{top-k1} relu(h̃) + λ · Σ_{top-k2} |h - h̃|`` ``(n,)``, both sums over the
    indices of the largest values of ``h`` (``k1``, ``k2``: percentages of the ``d``
    features, see :func:`top_count`)."""
    d = features.shape[1]
    top1 = features.topk(top_count(d, k1), dim=1).indices
    top2 = features.topk(top_count(d, k2), dim=1).indices
    correction = perturbed.relu().gather(1, top1).sum(dim=1)
    shift = (features - perturbed).abs().gather(1, top2).sum(dim=1)
    return correction + lmbda * shift


def ecdf_percentile(statistic: Tensor, calib_sorted: Tensor, low: float, high: float) -> Tensor:
    """Per-sample pruning percentile ``low + (1 - ECDF(Q')) · (high - low)`` (float64), with
    ``ECDF(q)`` the fraction of calibration statistics ``≤ q``; NaN statistics get ``high``."""
    reference = calib_sorted.to(device=statistic.device, dtype=torch.float64)
    q = statistic.to(torch.float64)
    below = torch.searchsorted(reference, q.contiguous(), right=True)
    ecdf = below.to(torch.float64) / len(reference)
    percentile = low + (1 - ecdf) * (high - low)
    return torch.where(q.isnan(), high, percentile)


def adascale_factor(features: Tensor, percentile: Tensor) -> Tensor:
    """``s1 / s2`` ``(n,)`` on ``relu(h)``: ``s1`` the row sum, ``s2`` the sum of the
    ``K = d - round(d · p / 100)`` largest values (per-sample ``p``, ``K ≥ 1``)."""
    x = features.relu()
    d = x.shape[1]
    kept = (d - torch.round(d * percentile / 100)).clamp(1, d).to(torch.int64).to(x.device)
    max_kept = int(kept.max()) if len(kept) else 1
    values = x.topk(max_kept, dim=1).values
    mask = torch.arange(max_kept, device=x.device)[None, :] < kept[:, None]
    return sum_ratio(x.sum(dim=1), (values * mask).sum(dim=1))


class AdaScale(HeadMixin, StreamingCalibration, BaseScoreClassif):
    """AdaSCALE (Regmi et al., "AdaSCALE: Adaptive Scaling for OOD Detection", 2025;
    OpenOOD's ``adascale_a`` / ``adascale_l`` postprocessors).

    Idea: SCALE rescales the penultimate features by a top-percentile sum ratio with one
    percentile for every input. OoD features are more sensitive to a tiny input change than
    in-distribution ones: one gradient step on the least sensitive input elements measures
    that, and the more an input's top features move, the more of them are kept (a lower
    percentile), which separates the energies further.

    Formula: with ``h`` the head input (``d`` features) and ``g = ∇_x max_c z_c``, the
    perturbed input ``x̃ = x + 0.5 · sign(g) · m`` (``m``: the ``int(o · numel(x))`` input
    elements of smallest ``|g|``) gives ``h̃``; ``Q' = Σ_{i ∈ top_k1(h)} relu(h̃_i) + λ ·
    Σ_{i ∈ top_k2(h)} |h_i - h̃_i|`` (``top_k``: indices of the ``int(d · k / 100)`` largest
    ``h``). The percentile is ``p = p_min + (1 - F(Q')) · (p_max - p_min)``, ``F`` the
    empirical CDF of ``Q'`` over calibration; ``r = s1 / s2`` with ``s1 = Σ relu(h)`` and
    ``s2`` its ``K = d - round(d · p / 100)`` largest values. Conformity = energy
    ``logsumexp(z')`` with ``z' = W (h · exp(r)) + b`` (``variant="a"``) or
    ``z' = (W h + b) · r²`` (``variant="l"``), identical for every class.

    Args:
        variant: ``"a"`` (activation scaling, ``adascale_a``) or ``"l"`` (logit scaling,
            ``adascale_l``).
        percentile: ``(p_min, p_max)``, ``0 < p_min ≤ p_max < 100`` (default ``(75, 85)``).
        k1: percentage of the features (largest ``h``) summed in the correction term
            (default 5).
        k2: percentage of the features (largest ``h``) whose shift is summed (default 1).
        lmbda: weight ``λ ≥ 0`` of the shift term (default 10).
        o: fraction ``0 ≤ o ≤ 1`` of the input elements perturbed (default 0.05).
        num_samples: calibration statistics kept for ``F`` (default 5000; ``None``: all).
            OpenOOD draws a random subset; here the kept samples are evenly spaced in the
            calibration stream, so a tensor and a DataLoader fit keep the same ones.
        max_batch: rows per gradient pass (``None``: the whole batch at once); results do
            not depend on it. Changing it keeps the score fit.
        head: module name of the linear head (``None``: discovered, see
            :class:`~scio.scores.core.head.HeadMixin`).
        act_norm: unused (the head input is read raw).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    ``out`` is the plain network output. The step 0.5 is OpenOOD's constant, in the
    network's input units (OpenOOD's inputs are normalised images). The counts
    ``int(d · k / 100)`` are at least 1 (OpenOOD's are 0 for ``d < 100 / k``, which drops
    the term) and ``K`` lies in ``[1, d]``.

    Cost: calibration runs, per batch, one forward with autograd, one backward to the inputs
    only (parameters frozen, as every gradient score) and one forward on the perturbed
    inputs, and keeps one float per sample. Inference: the same three passes, then a
    per-sample top-``K`` and one extra head product. Half precision is computed in float32
    and cast back.
    """

    variant: str = "a"
    percentile: tuple[float, float] | list[float] = (75.0, 85.0)
    k1: float = 5.0
    k2: float = 1.0
    lmbda: float = 10.0
    o: float = 0.05
    num_samples: int | None = 5000
    max_batch: int | None = DEFAULT_MAX_BATCH

    _extension_params = BaseScoreClassif._extension_params | {"max_batch"}
    _keeps_fit = frozenset({"max_batch"})  # a memory bound only
    _fitted_attrs: ClassVar[tuple[str, ...]] = (
        *HeadMixin._head_fitted_attrs,
        "calib_statistic",
    )

    # -- parameters ---------------------------------------------------------------------------
    def _check_param_value(self, name: str, value: Any) -> None:
        _validate(name, value)
        super()._check_param_value(name, value)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        for name in ("variant", "percentile", "k1", "k2", "lmbda", "o", "num_samples"):
            _validate(name, getattr(self, name))
        check_max_batch(self.max_batch)

    @property
    def _calib_needs_grad(self) -> bool:
        return True

    @property
    def _inference_needs_grad(self) -> bool:
        return True

    # -- the perturbation pass ------------------------------------------------------------------
    def _probe(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(out, h, Q')`` of one chunk: forward with graph, input backward, forward."""
        x = inputs.detach().requires_grad_()  # a new view: the caller's flag is unchanged
        with torch.enable_grad():
            out, features = self.head_forward(x)
            grad = batched_grad(out.max(dim=1).values, x)
        perturbed_x = adascale_perturb(x.detach(), grad, self.o)
        with torch.no_grad():
            _, perturbed = self.head_forward(perturbed_x)
        dtype = work_dtype(features.dtype)
        h = features.detach().to(dtype)
        statistic = adascale_statistic(h, perturbed.to(dtype), self.k1, self.k2, self.lmbda)
        return out.detach(), h, statistic

    def _probe_all(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with frozen_parameters(self.rnet.net):
            out, h, statistic = by_chunks(self._probe, inputs, self.max_batch)
        return out, h, statistic

    # -- calibration ----------------------------------------------------------------------------
    def _calib_update(self, batch: CalibBatch) -> None:
        _, _, statistic = self._probe_all(batch.inputs)
        self._state.append("statistic", statistic)

    def _calib_end(self) -> None:
        statistic = self._state.cat("statistic")
        n = len(statistic)
        if self.num_samples is not None and n > self.num_samples:
            rows = torch.arange(self.num_samples, device=statistic.device) * n // self.num_samples
            statistic = statistic[rows]
        self.calib_statistic: Tensor = statistic.sort().values

    # -- inference ------------------------------------------------------------------------------
    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, h, statistic = self._probe_all(inputs)
        low, high = (float(p) for p in self.percentile)
        percentile = ecdf_percentile(statistic, self.calib_statistic, low, high)
        ratio = adascale_factor(h, percentile)
        weight = self.head_weight.detach().to(h.dtype)
        bias = self.head_bias
        b = None if bias is None else bias.detach().to(h.dtype)
        if self.variant == "a":
            logits = F.linear(h * ratio.exp()[:, None], weight, b)
        else:
            logits = F.linear(h, weight, b) * (ratio**2)[:, None]
        return out, torch.logsumexp(logits, dim=1).to(out.dtype)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate(name: str, value: Any) -> None:
    """Raise ``ParamError`` naming ``name`` unless ``value`` is valid for it."""
    if name == "variant":
        if value not in VARIANTS:
            msg = f"`variant` must be one of {VARIANTS} (got {value!r})"
            raise ParamError(msg)
    elif name == "percentile":
        ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_real, value))
        if not ok:
            msg = f"`percentile` must be a pair (p_min, p_max) of numbers (got {value!r})"
            raise ParamError(msg)
        low, high = (float(p) for p in value)
        if not 0 < low <= high < 100:  # also false for NaN
            msg = f"`percentile` must satisfy 0 < p_min <= p_max < 100 (got {value!r})"
            raise ParamError(msg)
    elif name in ("k1", "k2"):
        if not _is_real(value) or not 0 < value <= 100:
            msg = f"`{name}` must be a percentage in (0, 100] (got {value!r})"
            raise ParamError(msg)
    elif name == "lmbda":
        if not _is_real(value) or not 0 <= value < math.inf:
            msg = f"`lmbda` must be a finite number >= 0 (got {value!r})"
            raise ParamError(msg)
    elif name == "o":
        if not _is_real(value) or not 0 <= value <= 1:
            msg = f"`o` must be a fraction in [0, 1] (got {value!r})"
            raise ParamError(msg)
    elif name == "num_samples" and value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"`num_samples` must be a positive integer or None (got {value!r})"
            raise ParamError(msg)
    elif name == "max_batch":
        try:
            check_max_batch(value)
        except ValueError as exc:
            raise ParamError(str(exc)) from None
