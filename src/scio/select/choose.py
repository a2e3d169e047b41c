"""Choose among candidate scores (each tuned on its own grid) on validation data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from scio.recorder import Recorder
from scio.scores import BaseScoreClassif
from scio.select.combine import RankAverage
from scio.select.metric import best_index, resolve_metric, validation_values
from scio.select.result import ResultTable, TuneResult
from scio.select.tune import DEFAULT_BATCH_SIZE, Entry, search

__all__ = ["ChoiceResult", "choose"]


@dataclass(frozen=True, eq=False)
class ChoiceResult:
    """The outcome of :func:`scio.select.choose`.

    Attributes:
        results: one :class:`~scio.select.TuneResult` per candidate, in candidate order.
        names: display names of the candidates.
        best: index of the chosen candidate (best validation metric; the first one on
            ties, in candidate order then grid order).
        table: every grid point of every candidate: ``candidate`` (index), ``score``
            (name), ``point``, the parameters, and the validation metric.
        metric: the metric's name.
        combination: the rank average of the ``combine`` best candidates (``None`` when
            ``combine < 2``); its members are their tuned scores, its reference their
            validation InD confidences (candidates whose metric is NaN or whose validation
            InD confidences are not all finite are left out).
        combination_value: the combination's metric on the **same validation data**.
        combination_members: the candidates combined, best first.
    """

    results: list[TuneResult]
    names: list[str]
    best: int
    table: ResultTable
    metric: str
    combination: RankAverage | None = None
    combination_value: float | None = None
    combination_members: list[int] = field(default_factory=list)

    @property
    def score(self) -> BaseScoreClassif:
        """The chosen candidate's fitted score (with its best parameters)."""
        return self.results[self.best].score

    @property
    def name(self) -> str:
        """The chosen candidate's name."""
        return self.names[self.best]

    @property
    def best_params(self) -> dict[str, Any]:
        """The chosen candidate's best grid point."""
        return self.results[self.best].best_params

    @property
    def best_value(self) -> float:
        """The chosen candidate's validation metric."""
        return self.results[self.best].best_value


def _entry(candidate: Any, i: int) -> Entry:
    """``(score, grid, layers)`` from a score or a ``(score, grid[, layers])`` tuple."""
    if isinstance(candidate, BaseScoreClassif):
        return candidate, None, None
    if isinstance(candidate, tuple | list) and len(candidate) in (2, 3):
        score, grid = candidate[0], candidate[1]
        layers = candidate[2] if len(candidate) == 3 else None
        return score, grid, layers
    msg = (
        f"`candidates[{i}]` must be a score or a (score, grid) / (score, grid, layers) tuple "
        f"(got {candidate!r})"
    )
    raise TypeError(msg)


def choose(
    candidates: Sequence[Any],
    rnet: Recorder | nn.Module,
    calib_data: Any,
    val_id: Any,
    val_ood: Any,
    *,
    calib_labels: Any = None,
    metric: Any = "auroc",
    combine: int = 0,
    names: Sequence[str] | None = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    show_progress: bool = True,
) -> ChoiceResult:
    """Tune every candidate score on its own grid and choose the best on validation data.

    All grid points of all candidates share one recorded forward per calibration batch and
    one per validation batch (as in :func:`scio.select.tune`, whose rules apply: grid
    order, ties, metrics, checks before any forward).

    Args:
        candidates: each a ``(score, grid)`` pair, a ``(score, grid, layers)`` triple (the
            layers the score records; default: those ``rnet`` records), or a bare score.
            ``grid=None`` evaluates the score as it is: refit on ``calib_data``, or, if it is
            already fit (on the same network), only evaluated.
        rnet: the network, or a :class:`~scio.recorder.Recorder` on it whose recorded
            layers are the default ``layers``.
        calib_data, val_id, val_ood, calib_labels, metric, batch_size, show_progress: as in
            :func:`scio.select.tune`.
        combine: if ``k >= 2``, also build the :class:`~scio.select.RankAverage` of the
            ``k`` best candidates (by their best validation metric) and evaluate it on the
            same validation data. Nothing here ever looks at test data.
        names: display names (default: ``str(score)``).

    Returns:
        A :class:`ChoiceResult`: ``score``/``name``/``best_params`` of the winner,
        ``results`` per candidate, the whole ``table``, the ``combination``.
    """
    entries = [_entry(candidate, i) for i, candidate in enumerate(candidates)]
    if not entries:
        msg = "`candidates` is empty: give at least one score"
        raise ValueError(msg)
    labels = [str(score) for score, _, _ in entries] if names is None else list(names)
    if len(labels) != len(entries):
        msg = f"`names` must have one name per candidate ({len(entries)}), got {len(labels)}"
        raise ValueError(msg)
    if isinstance(rnet, Recorder):
        net, layers = rnet.net, tuple(rnet.recording)
    elif isinstance(rnet, nn.Module):
        net, layers = rnet, ()
    else:
        msg = f"`rnet` must be a Recorder or a torch.nn.Module (got {type(rnet).__name__})"
        raise TypeError(msg)
    if isinstance(combine, bool) or not isinstance(combine, int) or combine < 0:
        msg = f"`combine` must be a non-negative integer (got {combine!r})"
        raise ValueError(msg)
    metric_name, metric_obj = resolve_metric(metric)
    results = search(
        entries, net, layers, calib_data, val_id, val_ood,
        calib_labels=calib_labels, metric=metric, batch_size=batch_size,
        show_progress=show_progress, names=[f"candidates[{i}] grid" for i in range(len(entries))],
    )  # fmt: skip
    rows = []
    for i, result in enumerate(results):
        for row in result.table:
            value = row.pop(result.metric)
            rows.append({"candidate": i, "score": labels[i], **row, metric_name: value})
    higher = bool(metric_obj.higher_is_better)
    values = np.array([result.best_value for result in results])
    best = best_index(values, higher)
    choice = ChoiceResult(
        results=results,
        names=labels,
        best=0 if best is None else best,
        table=ResultTable(rows, metric_name, higher_is_better=higher),
        metric=metric_name,
    )
    if combine < 2:
        return choice
    # members: the `combine` best candidates with a metric and finite reference confidences
    order = ResultTable(
        [{"i": i, "v": v} for i, v in enumerate(values)], "v", higher_is_better=higher
    ).sorted()
    usable = [
        int(row["i"])
        for row in order
        if not np.isnan(row["v"]) and np.isfinite(results[int(row["i"])].val_confidences[0]).all()
    ]
    members = usable[:combine]
    if len(members) < 2:
        return choice
    combination = RankAverage(
        [results[i].score for i in members],
        [results[i].val_confidences[0] for i in members],
        names=[labels[i] for i in members],
    )
    conf_id = combination.combine([results[i].val_confidences[0] for i in members])
    conf_ood = combination.combine([results[i].val_confidences[1] for i in members])
    value = float(validation_values(conf_id, conf_ood, metric_obj)[0])
    return replace(
        choice, combination=combination, combination_value=value, combination_members=members
    )
