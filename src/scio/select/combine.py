"""Rank-average combination of fitted scores, calibrated on in-distribution reference data.

Each member's confidence is replaced by its (interpolated mid-)rank among the member's
confidences on reference in-distribution inputs, normalised to ``(0, 1)``, and the ranks
are averaged. A rank is a per-sample quantity (the reference set is fixed), so the
combination scores any single input the same way whatever else is in its batch.

References:
    Rank averaging of detectors, e.g. A. Lazarevic and V. Kumar, "Feature Bagging for
    Outlier Detection", KDD 2005 (combination by ranks, robust to each detector's scale).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from scio.scores import BaseScoreClassif, JointInference

__all__ = ["RankAverage", "reference_ranks"]

FloatArray = npt.NDArray[np.float64]


def reference_ranks(reference: npt.ArrayLike, values: npt.ArrayLike) -> FloatArray:
    """Normalised rank of each of ``values`` among ``reference`` (float64, in ``(0, 1)``).

    At a reference value ``r``: the mid-rank ``(#{ref < r} + #{ref == r} / 2) / m`` (``m``
    reference values); between two distinct reference values: linear interpolation; below
    the smallest (above the largest): a strictly increasing tail
    ``u_min / (1 + (r_min - x) / s)`` (``1 - (1 - u_max) / (1 + (x - r_max) / s)``), with
    ``s`` the reference range (1 if zero), so far-away inputs keep their order. NaN stays
    NaN, ``-inf`` gives 0 and ``+inf`` gives 1.
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64).ravel())
    x = np.asarray(values, dtype=np.float64)
    if ref.size == 0 or not np.isfinite(ref).all():
        msg = f"`reference` must hold finite confidences (got {ref.size} values, some not finite)"
        raise ValueError(msg)
    points, first = np.unique(ref, return_index=True)
    counts = np.diff(np.append(first, ref.size))
    mid = (first + counts / 2) / ref.size
    spread = float(points[-1] - points[0]) or 1.0
    inside = np.interp(x, points, mid)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # unused branches
        below = mid[0] / (1 + (points[0] - x) / spread)
        above = 1 - (1 - mid[-1]) / (1 + (x - points[-1]) / spread)
    ranks = np.where(x < points[0], below, np.where(x > points[-1], above, inside))
    ranks = np.where(np.isneginf(x), 0.0, np.where(np.isposinf(x), 1.0, ranks))
    return np.where(np.isnan(x), np.nan, ranks)


class RankAverage:
    """Average of the reference ranks of several fitted scores' confidences.

    Args:
        scores: fitted classification scores sharing one network (evaluated with one
            recorded forward per batch, :class:`~scio.scores.JointInference`).
        reference: for each score, its confidences (conformity of the predicted class) on
            in-distribution **validation** inputs — never test data.
        names: display names of the members (default: ``str(score)``).

    ``combination(x)`` returns one confidence per input, in ``(0, 1)`` (higher = more
    in-distribution); :meth:`combine` applies the same to precomputed confidences. It is a
    plain callable, not a :class:`~scio.scores.BaseScore`: it cannot be saved with
    ``save``; save its members and their reference confidences instead.
    """

    def __init__(
        self,
        scores: Sequence[BaseScoreClassif],
        reference: Sequence[npt.ArrayLike],
        names: Sequence[str] | None = None,
    ) -> None:
        if not scores:
            msg = "`scores` must hold at least one fitted score"
            raise ValueError(msg)
        if len(reference) != len(scores):
            msg = (
                f"`reference` must hold one array of confidences per score (got "
                f"{len(reference)} for {len(scores)} scores)"
            )
            raise ValueError(msg)
        self.scores = list(scores)
        self.reference = [np.sort(np.asarray(r, dtype=np.float64).ravel()) for r in reference]
        for i, ref in enumerate(self.reference):
            if ref.size == 0 or not np.isfinite(ref).all():
                msg = f"`reference[{i}]` must hold finite confidences (got {ref.size} values)"
                raise ValueError(msg)
        self.names = [str(s) for s in scores] if names is None else list(names)
        self._joint = JointInference(self.scores)

    def combine(self, confidences: npt.ArrayLike) -> FloatArray:
        """The combined confidence of precomputed member confidences ``(n_scores, n)``."""
        conf = np.atleast_2d(np.asarray(confidences, dtype=np.float64))
        if len(conf) != len(self.scores):
            msg = (
                f"`confidences` must have one row per score ({len(self.scores)}), got shape "
                f"{conf.shape}"
            )
            raise ValueError(msg)
        ranks = [reference_ranks(ref, row) for ref, row in zip(self.reference, conf)]
        return np.mean(ranks, axis=0)

    def __call__(self, inputs: Tensor) -> Tensor:
        """Combined confidence ``(n,)`` (float64, on ``inputs``' device): one forward."""
        rows = []
        for out, conformity in self._joint(inputs):
            if conformity.ndim == 2:
                conformity = conformity.gather(1, out.argmax(1, keepdim=True)).squeeze(1)
            rows.append(conformity.detach().to("cpu", torch.float64).numpy())
        return torch.from_numpy(self.combine(np.stack(rows))).to(inputs.device)

    def __repr__(self) -> str:
        return f"RankAverage({', '.join(self.names)})"
