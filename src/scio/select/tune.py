"""Tune a score's hyper-parameters on held-out validation data (OpenOOD v1.5's "APS" mode).

References:
    J. Zhang et al., "OpenOOD v1.5: Enhanced Benchmark for Out-of-Distribution Detection",
    DMLR 2024 (hyper-parameters chosen on an ID validation split and a validation OoD set
    disjoint from the test OoD sets).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from scio.recorder import DepthIdx, Recorder
from scio.scores import BaseScoreClassif
from scio.select.engine import (
    Candidate,
    check_data,
    fit_candidates,
    progress_bar,
    validation_confidences,
)
from scio.select.grid import Grid, expand_grid, make_candidates
from scio.select.metric import best_index, resolve_metric, validation_values
from scio.select.result import ResultTable, TuneResult

__all__ = ["DEFAULT_BATCH_SIZE", "search", "tune"]

DEFAULT_BATCH_SIZE = 256

#: ``(score, grid or None, layers or None)``: a ``None`` grid evaluates the score as it is
#: (refit on the calibration data unless it is already fit), ``None`` layers are the
#: recorder's.
Entry = tuple[BaseScoreClassif, Grid | None, Sequence[DepthIdx | str] | None]


def _check_score(score: Any, name: str) -> None:
    if not isinstance(score, BaseScoreClassif):
        msg = f"`{name}` must be a scio classification score (got {type(score).__name__})"
        raise TypeError(msg)


def search(
    entries: Sequence[Entry],
    net: nn.Module,
    default_layers: Sequence[DepthIdx | str],
    calib_data: Any,
    val_id: Any,
    val_ood: Any,
    *,
    calib_labels: Any = None,
    metric: Any = "auroc",
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    show_progress: bool = True,
    names: Sequence[str] | None = None,
) -> list[TuneResult]:
    """Search every entry's grid with shared forwards; one :class:`TuneResult` per entry.

    Every argument is checked before any forward: grids (names, values), metric, data
    shapes. Then all grid points of all entries are fit with one forward per calibration
    batch and evaluated with one forward per validation batch (:mod:`scio.select.engine`).
    """
    metric_name, metric_obj = resolve_metric(metric)
    higher = bool(metric_obj.higher_is_better)
    groups: list[tuple[list[dict[str, Any]], list[Candidate]]] = []
    for i, (score, grid, layers) in enumerate(entries):
        label = "grid" if names is None else names[i]
        _check_score(score, "score" if names is None else f"candidates[{i}]")
        layers = tuple(default_layers if layers is None else layers)
        if grid is None and score.is_fit:
            if score.rnet.net is not net:
                msg = f"{label}: a fitted candidate must be fit on the same network object"
                raise ValueError(msg)
            groups.append(([{}], [Candidate(score, layers, fitted=True)]))
            continue
        points = [{}] if grid is None else expand_grid(grid, name=label)
        scores = make_candidates(score, points, name=label)
        groups.append((points, [Candidate(s, layers) for s in scores]))
    check_data(calib_data, val_id, val_ood)

    candidates = [c for _, group in groups for c in group]
    with progress_bar(show_progress) as progress:
        fit_candidates(
            candidates, net, calib_data, calib_labels, batch_size=batch_size, progress=progress
        )
        conf_id, conf_ood = validation_confidences(
            [c.score for c in candidates], val_id, val_ood, batch_size=batch_size,
            progress=progress,
        )  # fmt: skip
    values = validation_values(conf_id, conf_ood, metric_obj)

    results, start = [], 0
    for i, (points, group) in enumerate(groups):
        stop = start + len(group)
        rows = [
            {"point": j, **point, metric_name: float(value)}
            for j, (point, value) in enumerate(zip(points, values[start:stop]))
        ]
        best = best_index(values[start:stop], higher)
        if best is None:
            what = "the score" if names is None else names[i]
            warnings.warn(
                f"every grid point of {what} gave NaN validation confidences: the first grid "
                "point is returned",
                RuntimeWarning,
                stacklevel=3,
            )
            best = 0
        results.append(
            TuneResult(
                score=group[best].score,
                best_params=dict(points[best]),
                table=ResultTable(rows, metric_name, higher_is_better=higher),
                metric=metric_name,
                higher_is_better=higher,
                best_index=best,
                val_confidences=(conf_id[start + best], conf_ood[start + best]),
            )
        )
        start = stop
    return results


def tune(
    score: BaseScoreClassif,
    grid: Grid,
    rnet: Recorder,
    calib_data: Any,
    val_id: Any,
    val_ood: Any,
    *,
    calib_labels: Any = None,
    metric: Any = "auroc",
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    show_progress: bool = True,
) -> TuneResult:
    """Choose ``score``'s hyper-parameters on validation data, never on test data.

    Every grid point (``score``'s parameters overridden by the point; ``score`` itself is
    not modified) is fit on ``calib_data`` and scored on ``val_id`` (in-distribution inputs
    disjoint from the calibration and test data) against ``val_ood`` (an OoD set that must
    be none of the test OoD sets, see ``docs/selection.md``). The whole grid costs **one**
    recorded forward per calibration batch and one per validation batch: grid points share
    the recorded activations (:func:`scio.scores.fit_jointly`,
    :class:`scio.scores.JointInference`); scores taking input gradients (ODIN or
    Mahalanobis with ``epsilon > 0``) run the passes each grid point needs.

    Args:
        score: the score to tune (its other parameters are kept).
        grid: ``{parameter: [values]}`` (the product is searched; the last key varies
            fastest) or a list of ``{parameter: value}`` dicts.
        rnet: a :class:`~scio.recorder.Recorder` recording the layers the score uses.
        calib_data: calibration inputs (a tensor, or an iterable of ``(inputs, labels)``).
        val_id: in-distribution validation inputs: a tensor, or a re-iterable collection of
            input batches or ``(inputs, ...)`` batches (e.g. a ``DataLoader``).
        val_ood: validation OoD inputs, like ``val_id``.
        calib_labels: labels of a tensor ``calib_data`` (for scores using labels).
        metric: ``"auroc"`` (default), ``"fpr@95"`` (FPR at 95 % TPR, lower is better) or
            ``"aupr"``, computed by :mod:`scio.eval` (or a :mod:`scio.eval` metric object).
        batch_size: inputs per forward for tensor data (``None``: one batch).
        show_progress: rich progress bars (calibration, validation, gradient passes).

    Returns:
        A :class:`~scio.select.TuneResult`: ``best_params``, ``table`` (one row per grid
        point, grid order), ``score`` (fitted with ``best_params``), ``metric``. Ties are
        broken by grid order (the first best point wins); deterministic. A grid point whose
        validation confidences hold NaN gets NaN and is never chosen.

    Raises:
        ValueError: before any forward, for an empty grid, a parameter ``score`` does not
            have, an unknown metric, empty validation sets, or ``val_ood`` (or ``val_id``)
            samples of another shape than ``val_id`` (or ``calib_data``).
        TypeError: ``rnet`` is not a Recorder, ``score`` not a classification score, or a
            validation set is a one-shot iterator (it is read once per group of points).

    Example::

        result = tune(KNN(k=50), {"k": [10, 50, 200]}, rnet, calib, val_id, val_ood)
        result.best_params, result.table.sorted(), result.score(x)
    """
    if not isinstance(rnet, Recorder):
        msg = (
            f"`rnet` must be a scio Recorder recording the score's layers (got "
            f"{type(rnet).__name__})"
        )
        raise TypeError(msg)
    if grid is None:
        msg = "`grid` is empty (None): give a dict of parameter -> values or a list of dicts"
        raise ValueError(msg)
    (result,) = search(
        [(score, grid, None)],
        rnet.net,
        rnet.recording,
        calib_data,
        val_id,
        val_ood,
        calib_labels=calib_labels,
        metric=metric,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    return result
