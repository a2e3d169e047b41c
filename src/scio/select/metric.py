"""Validation metrics of :mod:`scio.select`: the discriminative powers of :mod:`scio.eval`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from scio.eval import AUC, AUPR, FPR, BaseDiscriminativePower, compute_metrics

__all__ = ["METRICS", "best_index", "resolve_metric", "validation_values"]

#: Metric names accepted by :func:`scio.select.tune` and their :mod:`scio.eval` metric:
#: AUROC; FPR@95 (fraction of OoD accepted when 95 % of InD is kept, lower is better,
#: :class:`~scio.eval.FPR`); AUPR (average precision, OoD positive, :class:`~scio.eval.AUPR`).
METRICS: dict[str, Callable[[], BaseDiscriminativePower]] = {
    "auroc": AUC,
    "fpr@95": lambda: FPR(tpr=0.95),
    "aupr": AUPR,
}


def resolve_metric(metric: Any) -> tuple[str, BaseDiscriminativePower]:
    """``(name, metric object)`` for a name of :data:`METRICS` or a metric object."""
    if isinstance(metric, BaseDiscriminativePower):
        return str(metric), metric
    key = metric.lower() if isinstance(metric, str) else metric
    if key not in METRICS:
        msg = (
            f"`metric` must be one of {sorted(METRICS)} or a scio.eval metric object "
            f"(got {metric!r})"
        )
        raise ValueError(msg)
    return key, METRICS[key]()


def _rankable(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64] | None:
    """Confidences a ROC accepts, in the same order: ``None`` if any is NaN; ``-inf`` (the
    lowest confidence, which :class:`scio.eval.ROC` refuses) becomes a finite value below
    every finite one (ties between ``-inf`` values stay ties)."""
    if np.isnan(values).any():
        return None
    low = np.isneginf(values)
    if not low.any():
        return values
    finite = values[np.isfinite(values)]
    floor = float(finite.min()) - 1.0 if finite.size else 0.0
    return np.where(low, floor, values)


def validation_values(
    conf_id: npt.ArrayLike, conf_ood: npt.ArrayLike, metric: BaseDiscriminativePower
) -> npt.NDArray[np.float64]:
    """The metric of every row (one per grid point) of InD and OoD confidences.

    ``conf_id``: ``(n_points, n_id)``, ``conf_ood``: ``(n_points, n_ood)``; InD is the
    negative class and OoD the positive one, low confidence flags OoD (as in
    :func:`scio.eval.compute_metrics`, which computes each value). A row with a NaN
    confidence gets NaN.
    """
    ind = np.atleast_2d(np.asarray(conf_id, dtype=np.float64))
    ood = np.atleast_2d(np.asarray(conf_ood, dtype=np.float64))
    values = np.full(len(ind), np.nan)
    n_id = ind.shape[1]
    for i, (row_id, row_ood) in enumerate(zip(ind, ood)):
        both = _rankable(np.concatenate((row_id, row_ood)))
        if both is not None:
            values[i] = compute_metrics(both[None, :n_id], [both[None, n_id:]], [metric])[0, 0, 0]
    return values


def best_index(values: npt.ArrayLike, higher_is_better: bool) -> int | None:
    """Index of the best value, the **first** one on ties (grid order); ``None`` if every
    value is NaN."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or np.isnan(arr).all():
        return None
    return int(np.nanargmax(arr) if higher_is_better else np.nanargmin(arr))
