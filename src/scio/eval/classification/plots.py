"""Plots of confidences: histograms per score, ROC curves per OoD set, and both at once.

Plain matplotlib (seaborn is not needed). As in the reference, :func:`histogram_oods` and
:func:`roc_scores` return their axes and :func:`summary_plot` returns ``None``; pass
``return_figure=True`` to get its figure, and ``save=path`` to save it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import cycle
from os import PathLike
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt

from scio.eval.classification.naming import (
    IND_TITLE,
    ScoreClassifAndLayers,
    _ood_names,
    _score_and_layers_str,
    _score_names,
)
from scio.eval.classification.roc import ROC, _pessimistic_path
from scio.eval.classification.tables import _kept_rows
from scio.utils.misc import check

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["histogram_oods", "roc_scores", "summary_plot"]

FloatArray: TypeAlias = npt.NDArray[np.float64]
SavePath: TypeAlias = str | PathLike[str]

_HIST_STATS = {
    "count": "Count",
    "frequency": "Frequency",
    "probability": "Probability",
    "proportion": "Proportion",
    "percent": "Percent",
    "density": "Density",
}
_MAX_AUTO_BINS = 200


def _bin_edges(data: FloatArray, bins: Any, binrange: tuple[float, float] | None) -> FloatArray:
    edges = np.histogram_bin_edges(data, bins=bins, range=binrange)
    if isinstance(bins, str) and len(edges) > _MAX_AUTO_BINS + 1:
        edges = np.histogram_bin_edges(data, bins=_MAX_AUTO_BINS, range=binrange)
    return edges


def histogram_oods(
    conf_ind: npt.ArrayLike,
    conf_oods: Sequence[npt.ArrayLike],
    *,
    oods_title: Sequence[str] | None = None,
    score_and_layers: ScoreClassifAndLayers | str | None = None,
    **hist_kw: Any,
) -> Axes:
    """Overlaid histograms of one score's confidences on InD and on each OoD set.

    Plain matplotlib (same look as ``seaborn.histplot(..., hue="Dataset")``): x label
    ``"Confidence score"``, legend titled ``"Dataset"`` with ``"In-Distribution"`` then the
    OoD titles (or ``"OoD i"``), axes title = the score (and its layers).

    Keyword Args:
        ax: axes to draw on (default: current axes).
        bins: number of bins, edges or numpy rule (default ``"auto"``, at most 200 bins).
        binrange: ``(low, high)`` range of the bins.
        stat: ``"count"`` (default), ``"frequency"``, ``"probability"``/``"proportion"``,
            ``"percent"`` or ``"density"``.
        common_norm: normalise by the total number of samples (default ``True``) rather than
            per dataset.
        common_bins: same bins for every dataset (default ``True``).
        legend: show the legend (default ``True``).
        palette: colours, one per dataset (default: the matplotlib colour cycle).
        alpha: fill opacity (default 0.5).
        Other keywords are passed to :meth:`matplotlib.axes.Axes.stairs` (filled part).

    Non-finite confidences are left out of the histograms.
    """
    import matplotlib.pyplot as plt

    ax = hist_kw.pop("ax", None) or plt.gca()
    bins = hist_kw.pop("bins", "auto")
    binrange = hist_kw.pop("binrange", None)
    stat = hist_kw.pop("stat", "count")
    common_norm = hist_kw.pop("common_norm", True)
    common_bins = hist_kw.pop("common_bins", True)
    legend = hist_kw.pop("legend", True)
    palette = hist_kw.pop("palette", None)
    alpha = hist_kw.pop("alpha", 0.5)
    if stat not in _HIST_STATS:
        msg = f"Unsupported stat {stat!r}; supported: {', '.join(map(repr, _HIST_STATS))}"
        raise ValueError(msg)

    conf_oods = list(conf_oods)
    names = [IND_TITLE, *_ood_names(oods_title, len(conf_oods))]
    datasets = [np.asarray(c, dtype=np.float64).ravel() for c in (conf_ind, *conf_oods)]
    datasets = [d[np.isfinite(d)] for d in datasets]
    n_total = sum(len(d) for d in datasets)
    shared_edges = None
    if common_bins:
        shared_edges = _bin_edges(np.concatenate(datasets), bins, binrange)
    colors = (
        cycle(palette)
        if palette is not None
        else cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    )
    for name, data, color in zip(names, datasets, colors):
        edges = shared_edges if shared_edges is not None else _bin_edges(data, bins, binrange)
        counts = np.histogram(data, bins=edges)[0].astype(np.float64)
        norm = max(n_total if common_norm else len(data), 1)
        widths = np.diff(edges)
        if stat == "density":
            heights = counts / norm / widths
        elif stat in {"probability", "proportion"}:
            heights = counts / norm
        elif stat == "percent":
            heights = 100 * counts / norm
        elif stat == "frequency":
            heights = counts / widths
        else:
            heights = counts
        ax.stairs(heights, edges, fill=True, alpha=alpha, color=color, lw=0, label=name, **hist_kw)
        ax.stairs(heights, edges, color=color, lw=1)
    ax.set_xlabel("Confidence score")
    ax.set_ylabel(_HIST_STATS[stat])
    ax.set_title(_score_and_layers_str(score_and_layers))
    if legend:
        ax.legend(title="Dataset")
    return ax


def roc_scores(
    confs_ind: npt.ArrayLike,
    confs_ood: npt.ArrayLike,
    *,
    scores_and_layers: Sequence[ScoreClassifAndLayers | str] | None = None,
    ood_title: str | None = None,
    legend: bool = True,
    convex_hull: bool = False,
    ax: Axes | None = None,
    show_convex_hull: bool | None = None,
    colors: Sequence[Any] | None = None,
) -> Axes:
    """Pessimistic ROC curves of every score against one OoD set.

    Each score gets its Pareto points (dots) and the post-step pessimistic curve; with
    ``convex_hull`` (alias ``show_convex_hull``, the older name) the ROC convex hulls are
    added as dotted lines. Title: ``ood_title`` or ``"Out-of-Distribution"``; legend titled
    ``"Scores"`` at the lower right. ``colors`` (one per score; default: matplotlib's cycle)
    lets a score keep its colour across figures.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if show_convex_hull is not None:
        convex_hull = convex_hull or show_convex_hull
    ax = ax or plt.gca()
    ind = np.atleast_2d(np.asarray(confs_ind, dtype=np.float64))
    ood = np.atleast_2d(np.asarray(confs_ood, dtype=np.float64))
    check(len(ind) == len(ood), "One row of confidences per score, for InD and OoD")
    names = _score_names(scores_and_layers, len(ind))
    labels = np.concatenate((np.zeros(ind.shape[1], bool), np.ones(ood.shape[1], bool)))
    if colors is None:
        colors = _score_colors(len(ind))

    ax.plot([0, 1], [0, 1], "k--", lw=0.5)
    for conf_ind, conf_ood, name, color in zip(ind, ood, names, colors):
        roc = ROC(labels, np.concatenate((conf_ind, conf_ood)))
        ax.scatter(roc.FPR, roc.TPR, s=5, color=color, clip_on=False)
        ax.step(*_pessimistic_path(roc.FPR, roc.TPR), where="post", color=color, label=name)
        if convex_hull:
            ax.plot(np.append(roc.FPRch, 1), np.append(roc.TPRch, 1), ":", color=color)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(ood_title or "Out-of-Distribution")
    if legend:
        handles, texts = ax.get_legend_handles_labels()
        if convex_hull:
            handles.append(Line2D([], [], ls=":", color="k"))
            texts.append("Convex Hull")
        ax.legend(handles, texts, title="Scores", loc="lower right")
    return ax


def _score_colors(n_scores: int) -> list[Any]:
    """One colour per score index, from matplotlib's colour cycle."""
    import matplotlib.pyplot as plt

    cycle_colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle_colors[i % len(cycle_colors)] for i in range(n_scores)]


def _legend_flags(legend: bool | tuple[bool, bool]) -> tuple[bool, bool]:
    if isinstance(legend, tuple | list):
        hist, roc = legend
        return bool(hist), bool(roc)
    return bool(legend), bool(legend)


def summary_plot(
    confs_ind: npt.ArrayLike,
    confs_oods: Sequence[npt.ArrayLike],
    *,
    scores_and_layers: Sequence[ScoreClassifAndLayers | str] | None = None,
    keep: npt.ArrayLike | None = None,
    oods_title: Sequence[str] | None = None,
    legend: bool | tuple[bool, bool] = True,
    convex_hull: bool = False,
    show: bool = True,
    block: bool | None = None,
    save: SavePath | None = None,
    return_figure: bool = False,
    show_convex_hull: bool | None = None,
    **hist_kw: Any,
) -> Figure | None:
    """One figure: top row, a histogram of confidences per score (:func:`histogram_oods`);
    bottom row, the ROC curves of every score per OoD set (:func:`roc_scores`).

    The figure is sized from its content (panels of about 3.4 × 3 in, wrapped titles) and the
    ROC legend sits below the ROC panels, so it never covers the curves; every score keeps
    the colour of its index in ``confs_ind``, also when ``keep`` selects some of them.

    Args:
        keep: show only these scores (integer indexes in any order, or a boolean mask; e.g.
            from :func:`topk_evals`).
        legend: ``bool`` or a ``(histograms, ROCs)`` pair; only the leftmost histogram
            legend is drawn.
        convex_hull: draw the ROC convex hulls (``show_convex_hull`` is the older name).
        show: ``plt.show(block=block)`` at the end.
        save: path where the figure is saved (any matplotlib format).
        return_figure: return the figure (default: ``None``, as the reference). Either way
            the figure stays open in pyplot, as the reference leaves it.
        **hist_kw: for the histograms (defaults ``bins=30, stat="density",
            common_norm=False``); ``ax`` is ignored.
    """
    import textwrap

    import matplotlib.pyplot as plt

    ind = np.atleast_2d(np.asarray(confs_ind, dtype=np.float64))
    oods = [np.atleast_2d(np.asarray(c, dtype=np.float64)) for c in confs_oods]
    check(
        len(ind) > 0 and len(oods) > 0,
        f"Need at least one score and one OoD set (got {len(ind)} scores, {len(oods)} OoD sets)",
    )
    pairs = list(scores_and_layers) if scores_and_layers is not None else None
    names = _score_names(pairs, len(ind))
    all_colors = _score_colors(len(ind))
    rows = _kept_rows(keep, len(ind))
    ind, oods = ind[rows], [ood[rows] for ood in oods]
    names, colors = [names[i] for i in rows], [all_colors[i] for i in rows]
    if pairs is None:
        names = [f"Score {i + 1}" for i in rows]
    n_scores, n_oods = len(ind), len(oods)
    check(n_scores > 0, "`keep` must select at least one score")
    titles = _ood_names(oods_title, n_oods)
    hist_legend, roc_legend = _legend_flags(legend)
    hist_kw = {"bins": 30, "stat": "density", "common_norm": False, **hist_kw}
    hist_kw.pop("ax", None)
    hist_kw.pop("legend", None)

    panel_w, panel_h = 3.4, 3.0
    n_wide = max(n_scores, n_oods)
    wrap = max(16, int(panel_w * n_wide / n_scores * 11))  # characters per title line
    wrapped = ["\n".join(textwrap.fill(line, wrap) for line in n.split("\n")) for n in names]
    title_lines = max(t.count("\n") + 1 for t in wrapped)
    legend_rows = math.ceil(n_scores / min(n_scores, max(1, n_oods * 2))) if roc_legend else 0
    fig = plt.figure(
        figsize=(
            max(6.4, panel_w * n_wide),
            2 * panel_h + 0.18 * (title_lines - 1) + 0.25 * legend_rows + 0.6,
        ),
        layout="constrained",
    )
    n_cols = math.lcm(n_scores, n_oods)
    grid = fig.add_gridspec(2, n_cols)
    hist_axes: list[Axes] = []
    for i in range(n_scores):
        width = n_cols // n_scores
        ax = fig.add_subplot(grid[0, i * width : (i + 1) * width])
        histogram_oods(
            ind[i],
            [ood[i] for ood in oods],
            oods_title=oods_title,
            score_and_layers=wrapped[i],
            ax=ax,
            legend=hist_legend and i == 0,
            **hist_kw,
        )
        ax.title.set_fontsize("small")
        ax.set_yticks([])
        if i > 0:
            ax.set_ylabel("")
        hist_axes.append(ax)
    roc_axes: list[Axes] = []
    for j in range(n_oods):
        width = n_cols // n_oods
        ax = fig.add_subplot(
            grid[1, j * width : (j + 1) * width], sharey=roc_axes[0] if roc_axes else None
        )
        roc_scores(
            ind,
            oods[j],
            scores_and_layers=names,
            ood_title=titles[j],
            legend=roc_legend and j == 0,
            convex_hull=convex_hull,
            show_convex_hull=show_convex_hull,
            ax=ax,
            colors=colors,
        )
        ax.set_aspect("auto")
        if j > 0:
            ax.set_ylabel("")
            ax.tick_params(labelleft=False)
            ax.set_xticks([0.2, 0.4, 0.6, 0.8, 1.0])
        roc_axes.append(ax)

    hist_leg = hist_axes[0].get_legend()
    if hist_leg is not None:
        hist_leg.set_loc("upper left")
        hist_leg.get_frame().set_edgecolor("0.6")
        hist_leg.get_frame().set_alpha(0.9)
    roc_leg = roc_axes[0].get_legend()
    if roc_leg is not None:  # below the ROC panels, so it never covers a curve
        handles = [h for h in roc_leg.legend_handles if h is not None]
        texts = [t.get_text() for t in roc_leg.get_texts()]
        roc_leg.remove()
        legend_out = fig.legend(
            handles,
            texts,
            title="Scores",
            loc="outside lower center",
            ncols=min(len(texts), max(1, n_oods * 2)),
            fontsize="small",
        )
        legend_out.get_frame().set_edgecolor("0.6")
    if save is not None:
        fig.savefig(save)
    if show:
        plt.show(block=block)
    return fig if return_figure else None
