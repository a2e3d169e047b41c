"""Benchmark helpers: fit scores, compute confidences and metrics, print and plot summaries.

Typical workflow (see ``examples/visualizing_and_evaluating.py``)::

    scores_fit = fit_scores(scores_and_layers, net, calib_data, calib_labels)
    confs_ind, confs_oods = compute_confidence(scores_fit, ind=ind, oods=oods)
    summary(confs_ind, confs_oods, scores_and_layers=..., oods_title=..., metrics=(AUC(),))

The helpers live in one module per concept: :mod:`~scio.eval.classification.confidence`
(fitting, confidences, metrics), :mod:`~scio.eval.classification.tables` (rich tables),
:mod:`~scio.eval.classification.plots` (histograms and ROC curves) and
:mod:`~scio.eval.classification.naming` (display names). This module keeps the reference's
import path for all of them and holds :func:`summary`, which combines a table and a plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from scio.eval.classification.confidence import (
    DEFAULT_BATCH_SIZE,
    compute_confidence,
    compute_metrics,
    fit_scores,
)
from scio.eval.classification.discriminative_power import BaseDiscriminativePower
from scio.eval.classification.naming import (
    IND_TITLE,
    ScoreClassifAndLayers,
)
from scio.eval.classification.naming import _ood_names as _ood_names  # re-exported
from scio.eval.classification.naming import _score_and_layers_str as _score_and_layers_str
from scio.eval.classification.naming import _score_names as _score_names
from scio.eval.classification.plots import SavePath, histogram_oods, roc_scores, summary_plot
from scio.eval.classification.tables import _optimal_rows, summary_table, topk_evals
from scio.eval.classification.tables import _summary_table as _summary_table  # re-exported
from scio.utils.misc import check

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "IND_TITLE",
    "ScoreClassifAndLayers",
    "compute_confidence",
    "compute_metrics",
    "fit_scores",
    "histogram_oods",
    "roc_scores",
    "summary",
    "summary_plot",
    "summary_table",
    "topk_evals",
]


def summary(
    confs_ind: npt.ArrayLike,
    confs_oods: Sequence[npt.ArrayLike],
    *,
    scores_and_layers: Sequence[ScoreClassifAndLayers | str] | None = None,
    oods_title: Sequence[str] | None = None,
    metrics: Sequence[BaseDiscriminativePower] | None = None,
    topk: int = 0,
    baseline: int | None = None,
    optimal_only: bool = False,
    legend: bool | tuple[bool, bool] = True,
    convex_hull: bool = False,
    show: bool = True,
    block: bool | None = None,
    save: SavePath | None = None,
    return_figure: bool = False,
    show_convex_hull: bool | None = None,
    **hist_kw: Any,
) -> Figure | None:
    """:func:`summary_table` (when ``metrics`` are given) then :func:`summary_plot`.

    With ``metrics`` and ``0 < topk <= n_scores``, only the scores in the top ``topk`` of at
    least one (OoD set, metric) are shown (:func:`topk_evals`, higher is better, the
    ``baseline`` always kept), as in the reference; ``topk=0`` (default) shows every score.
    ``optimal_only`` keeps the scores reaching the best value of at least one (OoD set,
    metric) following each metric's ``higher_is_better``; the ``baseline`` score is left out
    of that comparison but always kept. Other arguments are those of the two functions.

    Returns:
        ``None``, as the reference; the figure of :func:`summary_plot` with
        ``return_figure=True``.
    """
    ind = np.atleast_2d(np.asarray(confs_ind, dtype=np.float64))
    oods = [np.atleast_2d(np.asarray(c, dtype=np.float64)) for c in confs_oods]
    pairs = list(scores_and_layers) if scores_and_layers is not None else None
    if baseline is not None:
        check(-len(ind) <= baseline < len(ind), "`baseline` must index a score")
        baseline %= len(ind)
    if metrics:
        evals = compute_metrics(ind, oods, metrics)
        rows: list[int] | None = None
        if optimal_only:
            rows = _optimal_rows(evals, metrics, baseline)
        elif 0 < topk <= len(ind):
            rows = [int(i) for i in topk_evals(evals, topk, baseline=baseline)]
        summary_table(
            evals,
            scores_and_layers=pairs,
            keep=rows,
            oods_title=oods_title,
            metrics=metrics,
            baseline=baseline,
        )
    else:
        rows = None
    return summary_plot(
        ind,
        oods,
        scores_and_layers=pairs,
        keep=rows,
        oods_title=oods_title,
        legend=legend,
        convex_hull=convex_hull,
        show=show,
        block=block,
        save=save,
        return_figure=return_figure,
        show_convex_hull=show_convex_hull,
        **hist_kw,
    )
