"""CFOOD: concentration-free outlier factor of the features among calibration features."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from scio.index.bank import append_rows, take_rows
from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.core.validation import ParamRange, param_ranges

__all__ = ["CFOOD", "cfood_grid", "cfood_kappa", "cfood_rank", "cfood_reference_radii"]

_F64 = torch.float64
#: Elements of one block of a distance (or rank) matrix.
_BLOCK_ELEMENTS = 2**22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return _F64 if dtype == _F64 else torch.float32


def _unit(features: Tensor) -> Tensor:
    """Rows divided by ``||x|| + 1e-10`` (compute dtype)."""
    x = features.reshape(features.shape[0], -1).to(_compute_dtype(features.dtype))
    return x / (x.norm(dim=1, keepdim=True) + 1e-10)


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``||a_i - b_j||²`` ``(n, m)`` from matrix products, clamped at 0."""
    sq = a.square().sum(dim=1, keepdim=True) + b.square().sum(dim=1) - 2 * (a @ b.T)
    return sq.clamp(min=0)


def cfood_grid(n: int) -> tuple[Tensor, Tensor]:
    """``(kval, kpos)``: the neighbourhood fractions ``κ`` tried (float64) and the 0-based
    positions ``⌊κ n - 1⌋`` (truncated towards 0) of the matching neighbour among ``n``
    reference samples; fractions whose position does not grow are dropped.

    The grid is 100 fractions from 0.001 to 0.1, 81 from 0.105 to 0.5 and 49 from 0.51 to
    0.99 (evenly spaced), OpenOOD's.
    """
    kval = np.concatenate(
        [np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)]
    )
    kpos = (kval * n - 1).astype(np.int64)  # truncation towards 0, as int()
    keep = np.concatenate([[True], kpos[1:] > kpos[:-1]])
    return torch.from_numpy(kval[keep].copy()), torch.from_numpy(kpos[keep].copy())


def cfood_rank(k: float, n: int) -> int:
    """Smallest count ``m`` of reference samples with ``float32(m / n) >= float32(k)``: the
    reverse-neighbour count required by the fraction ``k`` (1 ≤ m ≤ n)."""
    counts = torch.arange(n + 1, dtype=torch.float32) / float(n)
    return int((counts >= torch.tensor(k, dtype=torch.float32)).int().argmax())


def cfood_reference_radii(reference: Tensor, kpos: Tensor) -> Tensor:
    """``(n, len(kpos))``: for every reference row, its squared distance to its
    ``kpos + 1``-th nearest other reference row (float64, sorted along each row)."""
    ref = reference.to(_F64)
    n = len(ref)
    columns = (kpos + 1).to(ref.device)
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))
    radii = [
        _squared_distances(ref[i : i + step], ref).sort(dim=1).values[:, columns]
        for i in range(0, n, step)
    ]
    return torch.cat(radii) if radii else ref.new_zeros((0, len(columns)))


def cfood_kappa(queries: Tensor, reference: Tensor, radii: Tensor, rank: int) -> Tensor:
    """Grid index ``(n,)`` of each query's outlier factor: the first ``j`` such that at
    least ``rank`` reference rows ``i`` have the query inside their radius ``radii[i, j]``
    (``radii.shape[1]`` when there is none).

    Each radius row is sorted, so ``q`` lies inside the radii ``j ≥ t_i`` of row ``i``
    (``t_i`` found by binary search): the answer is the ``rank``-th smallest ``t_i``, read
    from a cumulative histogram built block by block over the reference rows.
    """
    n_grid = radii.shape[1]
    hist = torch.zeros((queries.shape[0], n_grid + 1), dtype=torch.int64, device=queries.device)
    if torch.compiler.is_exporting():  # one block: the batch size stays symbolic
        step = max(1, len(reference))
    else:
        step = max(1, _BLOCK_ELEMENTS // max(len(queries), 1))
    for i in range(0, len(reference), step):
        dist = _squared_distances(queries, reference[i : i + step])  # (n, b)
        first = torch.searchsorted(radii[i : i + step].contiguous(), dist.T.contiguous())
        hist.scatter_add_(1, first.T, torch.ones_like(first.T))
    reached = hist.cumsum(dim=1) >= rank
    return reached.int().argmax(dim=1)


class CFOOD(StreamingCalibration, BaseScoreClassif):
    """Concentration-free OoD detection (Angiulli, Fassetti & Zupi, "CF-OOD:
    Concentration-Free Density Estimation for Reliable Out-of-Distribution Detection";
    OpenOOD's ``cfood`` postprocessor), after the concentration-free outlier factor CFOF
    (Angiulli, "CFOF: a concentration free measure for anomaly detection", ACM TKDD 2020).

    Idea: in high dimension distances concentrate, so a raw nearest-neighbour distance says
    little. CFOF asks instead how large the neighbourhoods of the reference samples must be
    for a fraction ``k`` of them to count the input among their neighbours (reverse
    neighbourhood): small for inliers, large for outliers.

    Formula: features (recorded layers, flattened and concatenated, ``act_norm`` applied)
    are divided by ``||x|| + 1e-10``. A reference set of ``n = ⌊α N⌋`` calibration features
    (a seeded uniform subsample; all when ``α = 1``) is kept and, for each fraction ``κ`` of
    a fixed grid (:func:`cfood_grid`), the squared distance ``r_i(κ)`` from each reference
    sample ``i`` to its ``(⌊κ n - 1⌋ + 1)``-th nearest other reference sample. An input's
    outlier factor is the smallest grid ``κ`` with ``#{i : ||x - x_i||² ≤ r_i(κ)} / n ≥ k``
    (1 if none) and ``conformity = -κ``, identical for every class. Labels are not used.

    Args:
        alpha: fraction of the calibration set kept as reference, ``0 < α ≤ 1`` (default 0.1,
            OpenOOD's).
        k: reverse-neighbourhood fraction, ``0 < k ≤ 1`` (default 0.01, OpenOOD's).
        avg_topk: OpenOOD's reserved flag; only ``False`` (OpenOOD defines no other
            behaviour; ``True`` raises).
        seed: extension: seed of the reference subsample (a CPU ``randperm``, the same for
            any batching of the calibration data).
        act_norm: normalisation applied to the recorded activations before the unit scaling.
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: calibration keeps the ``(N, d)`` features until the end, then one ``n × n`` float64
    distance matrix (by row blocks) and its sorted rows (``O(n² (d + log n))``). Inference:
    one forward, one ``(b × d)·(d × n)`` distance product and one binary search per reference
    row over the ``≤ 230``-point grid (``O(b n (d + log 230))``). Fitted state: ``reference``
    ``(n, d)``, ``radii`` ``(n, |grid|)``, ``kval`` (the grid) and ``rank``
    (``⌈k n⌉`` in float32 arithmetic, :func:`cfood_rank`).
    """

    alpha: float = 0.1
    k: float = 0.01
    avg_topk: bool = False
    seed: int = 0

    _extension_params = BaseScoreClassif._extension_params | {"seed"}
    _param_ranges = param_ranges(
        alpha=ParamRange.interval(0, 1, closed="right"),
        # a fraction, not the base's integer count; its upper bound 1 is checked at fit (an
        # integer `k` is first checked as a count of calibration samples by the base)
        k=ParamRange.interval(0),
        avg_topk=ParamRange(
            lambda value: not value,
            "False (OpenOOD reserves it without defining another behaviour)",
        ),
    )

    _fitted_attrs: ClassVar[tuple[str, ...]] = ("reference", "radii", "kval", "rank")

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)  # each parameter's range
        if self.k > 1:
            msg = (
                f"Parameter `k` of CFOOD must be a number in (0, 1], a fraction of the "
                f"reference set (got {self.k!r})"
            )
            raise ParamError(msg)

    def _calib_update(self, batch: CalibBatch) -> None:
        (features,) = self.normalize(batch.activations, concatenate=True)
        append_rows(self._state, "features", _unit(features), None)

    def _calib_end(self) -> None:
        features = take_rows(self._state, "features")
        assert isinstance(features, Tensor)
        total = len(features)
        n = int(self.alpha * total) if self.alpha < 1 else total
        if n < 2:
            msg = (
                f"`alpha` keeps ⌊alpha · N⌋ = ⌊{self.alpha} · {total}⌋ = {n} reference "
                "sample(s); CFOOD needs at least 2 (raise `alpha` or calibrate on more data)"
            )
            raise ParamError(msg)
        if n < total:
            generator = torch.Generator().manual_seed(int(self.seed))
            rows = torch.randperm(total, generator=generator)[:n].sort().values
            features = features[rows.to(features.device)]
        kval, kpos = cfood_grid(n)
        self.reference: Tensor = features.contiguous()
        self.radii: Tensor = cfood_reference_radii(features, kpos).to(features.dtype)
        self.kval: Tensor = kval.to(features.device)
        self.rank: int = cfood_rank(float(self.k), n)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        (features,) = self.activations(concatenate=True)
        x = _unit(features)
        reference = self.reference.to(x)
        index = cfood_kappa(x, reference, self.radii.to(x), self.rank)
        kval = torch.cat([self.kval.to(x), x.new_ones(1)])
        return out, (-kval[index]).to(out.dtype)
