"""Benchmark helpers: fit scores, compute confidences and metrics, print and plot summaries.

Typical workflow (see ``examples/visualizing_and_evaluating.py``)::

    scores_fit = fit_scores(scores_and_layers, net, calib_data, calib_labels)
    confs_ind, confs_oods = compute_confidence(scores_fit, ind=ind, oods=oods)
    summary(confs_ind, confs_oods, scores_and_layers=..., oods_title=..., metrics=(AUC(),))

Conventions: the confidence of an input is the conformity of its predicted class; InD
samples are the negatives and OoD samples the positives of every ROC (low score = OoD).
Plots use matplotlib only (seaborn is not needed); figures are returned, optionally saved
with ``save=path`` and shown with ``show=True``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Iterable, Iterator, Sequence, Sized
from itertools import cycle
from os import PathLike
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import numpy as np
import numpy.typing as npt
import rich
import torch
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from torch import Tensor

from scio.eval.classification.discriminative_power import BaseDiscriminativePower
from scio.eval.classification.roc import ROC, _pessimistic_path
from scio.recorder import DepthIdx
from scio.scores import BaseScoreClassif
from scio.utils.misc import HEAVY_HEAD_ROUNDED_BOTTOM, check

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
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

ScoreClassifAndLayers: TypeAlias = tuple[BaseScoreClassif, Collection[DepthIdx]]
FloatArray: TypeAlias = npt.NDArray[np.float64]
SavePath: TypeAlias = str | PathLike[str]

DEFAULT_BATCH_SIZE = 256
_IND_TITLE = "In-Distribution"


# -- display helpers ---------------------------------------------------------------------------
def _score_and_layers_str(score_and_layers: ScoreClassifAndLayers | str | None) -> str:
    """``str(score)``, plus ``"\\n↳ "`` and the recorded layers when there are some; a string
    label is returned as it is (as in the reference)."""
    if score_and_layers is None:
        return ""
    if isinstance(score_and_layers, str):
        return score_and_layers
    score, layers = score_and_layers
    text = str(score)
    if layers:
        text += "\n↳ " + ", ".join(map(str, layers))
    return text


def _score_names(
    scores_and_layers: Sequence[ScoreClassifAndLayers | str] | None, n_scores: int
) -> list[str]:
    if scores_and_layers is None:
        return [f"Score {i}" for i in range(1, n_scores + 1)]
    check(
        len(scores_and_layers) == n_scores,
        "`scores_and_layers` must have one (score, layers) pair or label per row of "
        f"confidences (got {len(scores_and_layers)} for {n_scores} scores)",
    )
    return [_score_and_layers_str(pair) for pair in scores_and_layers]


def _ood_names(oods_title: Sequence[str] | None, n_oods: int) -> list[str]:
    if oods_title is None:
        return [f"OoD {i}" for i in range(1, n_oods + 1)]
    check(
        len(oods_title) == n_oods,
        f"`oods_title` must have one title per OoD set (got {len(oods_title)} for {n_oods})",
    )
    return [str(title) for title in oods_title]


def _progress(show: bool) -> Progress:
    return Progress(
        SpinnerColumn(finished_text="✓"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not show,
    )


def _n_samples(data: object) -> int | None:
    """Number of samples of a tensor or of a ``DataLoader``-like object (if known)."""
    if isinstance(data, Tensor):
        return len(data)
    dataset = getattr(data, "dataset", None)
    return len(dataset) if isinstance(dataset, Sized) else None


def _batches(data: Any, batch_size: int | None) -> Iterator[Tensor]:
    """Input batches of a tensor (sliced) or of an iterable of tensors / ``(inputs, ...)``."""
    if isinstance(data, Tensor):
        size = len(data) if batch_size is None else batch_size
        check(size > 0, "`batch_size` must be a positive integer")
        for start in range(0, len(data), size):
            yield data[start : start + size]
        return
    for batch in data:
        yield batch if isinstance(batch, Tensor) else batch[0]


# -- fitting and inference ---------------------------------------------------------------------
def fit_scores(
    scores_and_layers: Iterable[ScoreClassifAndLayers],
    net: torch.nn.Module,
    calib_data: Any,
    calib_labels: Any = None,
    *,
    batch_size: int | None = None,
    show_progress: bool = True,
    distributed: Any = False,
) -> list[BaseScoreClassif]:
    """Fit every score on its layers of ``net``, with **one** forward pass per calibration batch.

    All scores share one feature pass (:func:`scio.scores.fit_jointly` records the union of
    their layers), instead of one pass per score.

    Args:
        scores_and_layers: ``(score, layers)`` pairs; each score records its ``layers``.
        net: the network shared by every score.
        calib_data: a tensor of inputs, or an iterable of ``(inputs, labels)`` batches.
        calib_labels: labels of a tensor ``calib_data`` (ignored by label-free scores).
        batch_size: split a tensor ``calib_data`` in batches of this size (default: one).
        show_progress: display a rich progress bar (in samples).
        distributed: ``True`` or a process group: ``calib_data`` is this rank's shard and the
            scores are merged over the ranks (see :func:`scio.scores.fit_jointly`).

    Returns:
        The fitted scores (the same objects), in input order.
    """
    from scio.scores import fit_jointly

    pairs = list(scores_and_layers)
    total = _n_samples(calib_data)
    description = "Fitting Scores..." + (f" ({total} samples)" if total is not None else "")
    names = ", ".join(str(score) for score, _ in pairs)
    with _progress(show_progress) as progress:
        task = progress.add_task(description, total=total, status=names)

        def on_batch(n_done: int) -> None:
            progress.update(task, completed=n_done)

        fitted = fit_jointly(
            pairs,
            net,
            calib_data,
            calib_labels,
            batch_size=batch_size,
            on_batch=on_batch,
            distributed=distributed,
        )
        done = progress.tasks[0].completed
        progress.update(task, total=total or done, completed=total or done, status="Done")
    return cast("list[BaseScoreClassif]", fitted)


def _predicted(out: Tensor, conformity: Tensor) -> FloatArray:
    """Conformity of the predicted class (``out.argmax(1)``) as a float64 array."""
    if conformity.ndim == 2:
        conformity = conformity.gather(1, out.argmax(1, keepdim=True)).squeeze(1)
    return conformity.detach().to("cpu", torch.float64).numpy()


def compute_confidence(
    scores_fit: Sequence[BaseScoreClassif],
    *,
    ind: Any,
    oods: Any,
    oods_title: Sequence[str] | None = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    show_progress: bool = True,
) -> tuple[FloatArray, tuple[FloatArray, ...]]:
    """Confidence of every fitted score on InD and OoD inputs (conformity of the predicted
    class, i.e. of ``out.argmax(1)``).

    Args:
        scores_fit: fitted classification scores.
        ind: in-distribution inputs: a tensor, or an iterable of tensors or of
            ``(inputs, ...)`` batches (e.g. a ``DataLoader``).
        oods: OoD sets, each like ``ind`` (a single tensor is one OoD set).
        oods_title: display names of the OoD sets (progress bar only).
        batch_size: inputs per forward pass when sets are tensors (``None``: whole set).
            Bounds memory: 50,000 inputs never need one giant forward pass.
        show_progress: display rich progress bars.

    Returns:
        ``(confs_ind, confs_oods)``: a float64 array ``(n_scores, n_ind)`` and a tuple of
        arrays ``(n_scores, n_ood_i)``.
    """
    ood_sets = [oods] if isinstance(oods, Tensor) else list(oods)
    titles = None if oods_title is None else _ood_names(oods_title, len(ood_sets))
    sets = [(_IND_TITLE, ind)]
    for i, ood in enumerate(ood_sets, 1):
        label = f"OoD {i}" + (f": {titles[i - 1]}" if titles is not None else "")
        sets.append((label, ood))

    from scio.scores import JointInference

    scores_list = list(scores_fit)
    results: list[list[FloatArray]] = [[] for _ in sets]
    if not scores_list:
        return np.empty((0, 0)), tuple(np.empty((0, 0)) for _ in sets[1:])
    # One recorded forward per batch for every score sharing a network (one group per net).
    groups: dict[int, list[int]] = {}
    for i, score in enumerate(scores_list):
        groups.setdefault(id(score.rnet.net), []).append(i)
    joints = [(JointInference([scores_list[i] for i in idx]), idx) for idx in groups.values()]
    names = ", ".join(str(score) for score in scores_list)
    with _progress(show_progress) as progress:
        main = progress.add_task("Computing confidences...", total=len(sets), status=names)
        tasks = []
        for label, data in sets:
            n = _n_samples(data)
            desc = f"↳ {label}" + (f" ({n} samples)" if n is not None else "")
            tasks.append(progress.add_task(desc, total=n, status=""))
        for task, (_, data), result in zip(tasks, sets, results):
            per_score: list[FloatArray | None] = [None] * len(scores_list)
            for joint, idx in joints:
                progress.reset(task)
                device = next((p.device for p in joint.net.parameters()), None)

                def on_batch(n_done: int, task: Any = task) -> None:
                    progress.update(task, completed=n_done)

                batches = (
                    b if device is None else b.to(device) for b in _batches(data, batch_size)
                )
                for i, (out, conformity) in zip(idx, joint.run(batches, on_batch=on_batch)):
                    per_score[i] = _predicted(out, conformity)
            result.extend(row for row in per_score if row is not None)
            progress.advance(main)
        progress.update(main, status="Done")

    def stack(rows: list[FloatArray]) -> FloatArray:
        return np.stack(rows) if rows else np.empty((0, 0))

    return stack(results[0]), tuple(stack(rows) for rows in results[1:])


def compute_metrics(
    confs_ind: npt.ArrayLike,
    confs_oods: Sequence[npt.ArrayLike],
    metrics: Sequence[BaseDiscriminativePower],
) -> FloatArray:
    """Evaluate every metric for every (score, OoD set) pair.

    InD samples are labelled ``False`` (negatives) and OoD samples ``True`` (positives).

    Returns:
        ``evals`` of shape ``(n_scores, n_oods, n_metrics)``.
    """
    ind = np.atleast_2d(np.asarray(confs_ind, dtype=np.float64))
    oods = [np.atleast_2d(np.asarray(c, dtype=np.float64)) for c in confs_oods]
    evals = np.empty((len(ind), len(oods), len(metrics)))
    for j, ood in enumerate(oods):
        check(len(ood) == len(ind), "Every OoD set needs one row of confidences per score")
        labels = np.concatenate((np.zeros(ind.shape[1], bool), np.ones(ood.shape[1], bool)))
        for i in range(len(ind)):
            roc = ROC(labels, np.concatenate((ind[i], ood[i])))
            evals[i, j] = [metric.from_roc(roc) for metric in metrics]
    return evals


# -- tables ------------------------------------------------------------------------------------
def _best_is_max(metrics: Sequence[BaseDiscriminativePower] | None, n_metrics: int) -> list[bool]:
    if metrics is None:
        return [True] * n_metrics
    return [bool(getattr(metric, "higher_is_better", True)) for metric in metrics]


def _better(a: FloatArray | float, b: FloatArray | float, higher: bool) -> Any:
    return np.greater(a, b) if higher else np.less(a, b)


def _best_values(values: FloatArray, higher: Sequence[bool]) -> FloatArray:
    """Best value over the scores (axis 0) for every (OoD, metric); NaNs ignored."""
    if values.shape[0] == 0:
        return np.full(values.shape[1:], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        top, bottom = np.nanmax(values, axis=0), np.nanmin(values, axis=0)
    return np.where(np.asarray(higher, dtype=bool), top, bottom)


def topk_evals(
    evals: npt.ArrayLike, k: int = 1, *, baseline: int | None = None
) -> npt.NDArray[np.intp]:
    """Sorted indexes of the rows (scores) reaching the top ``k`` of at least one scenario.

    ``evals`` has shape ``(n, *scenarios)`` (e.g. from :func:`compute_metrics`); higher is
    better and NaN is never in a top ``k``. If ``not 0 < k <= n`` every row is returned. The
    ``baseline`` row, when given, is left out of the ranking and always returned. Pass the
    result as ``keep=`` to :func:`summary_table` / :func:`summary_plot`.
    """
    values = np.array(evals, dtype=np.float64)
    n = len(values)
    if not 0 < k <= n:
        return np.arange(n)
    if baseline is not None:
        values[baseline] = np.nan
    ranked = np.where(np.isnan(values), -np.inf, values)
    kth = -np.sort(-ranked, axis=0)[k - 1]  # k-th best of every scenario
    with np.errstate(invalid="ignore"):
        mask = (values >= kth).reshape(n, -1).any(axis=1)
    if baseline is not None:
        mask[baseline] = True
    return np.flatnonzero(mask)


def _kept_rows(keep: npt.ArrayLike | None, n_scores: int) -> list[int]:
    """Row indexes selected by ``keep`` (integer indexes, any order, or a boolean mask)."""
    if keep is None:
        return list(range(n_scores))
    arr = np.asarray(keep)
    if arr.dtype == bool:
        check(
            arr.shape == (n_scores,),
            f"A boolean `keep` must have shape ({n_scores},) (got {arr.shape})",
        )
        return [int(i) for i in np.flatnonzero(arr)]
    check(
        arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer),
        f"`keep` must be a 1D array of integer indexes or a boolean mask (got {arr!r})",
    )
    return [int(i) % n_scores for i in arr]


def _summary_table(
    evals: npt.ArrayLike,
    *,
    scores_and_layers: Sequence[ScoreClassifAndLayers | str] | None = None,
    keep: npt.ArrayLike | None = None,
    oods_title: Sequence[str] | None = None,
    metrics: Sequence[BaseDiscriminativePower] | None = None,
    baseline: int | None = None,
) -> Table:
    values = np.asarray(evals, dtype=np.float64)
    check(values.ndim == 3, "`evals` must have shape (n_scores, n_oods, n_metrics)")
    n_scores, n_oods, n_metrics = values.shape
    if metrics is not None:
        check(len(metrics) == n_metrics, "One metric per entry of the last axis of `evals`")
    if baseline is not None:
        check(-n_scores <= baseline < n_scores, "`baseline` must index a score")
        baseline %= n_scores
    higher = _best_is_max(metrics, n_metrics)
    rows = _kept_rows(keep, n_scores)  # highlighting is computed on every score first

    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'s' if n > 1 else ''}"

    title = (
        f"Evaluation of {plural(len(rows), 'score')} against {plural(n_oods, 'OoD set')} and "
        f"{plural(n_metrics, 'metric')}"
    )
    if metrics:
        title += ":\n" + " / ".join(map(str, metrics))
    table = Table(
        title=escape(title),
        title_style="italic",
        box=HEAVY_HEAD_ROUNDED_BOTTOM,
        safe_box=False,
        show_lines=True,
    )
    table.add_column(
        "Scores" + ("\n↳ Recorded layers" if scores_and_layers is not None else ""),
        overflow="fold",
    )
    ood_names = None if oods_title is None else _ood_names(oods_title, n_oods)
    for j in range(n_oods):
        header = f"OoD {j + 1}" + (f":\n{ood_names[j]}" if ood_names is not None else "")
        table.add_column(escape(header), justify="center")

    best = _best_values(values, higher)
    names = _score_names(scores_and_layers, n_scores)
    for i in rows:
        name = names[i]
        cells = []
        for j in range(n_oods):
            texts = []
            for m in range(n_metrics):
                value = values[i, j, m]
                styles = []
                if value == best[j, m]:
                    styles.append("gold3")
                if baseline is None or (
                    i != baseline and _better(value, values[baseline, j, m], higher[m])
                ):
                    styles.append("bold")
                text = f"{value:.3f}"
                texts.append(f"[{' '.join(styles)}]{text}[/]" if styles else text)
            cells.append(" / ".join(texts))
        style = "underline" if i == baseline else None
        table.add_row(escape(name), *cells, style=style)
    return table


def summary_table(
    evals: npt.ArrayLike,
    *,
    scores_and_layers: Sequence[ScoreClassifAndLayers | str] | None = None,
    keep: npt.ArrayLike | None = None,
    oods_title: Sequence[str] | None = None,
    metrics: Sequence[BaseDiscriminativePower] | None = None,
    baseline: int | None = None,
) -> None:
    """Print (with rich) a table of ``evals`` ``(n_scores, n_oods, n_metrics)``.

    One row per score, one column per OoD set, each cell listing the metric values
    (``"{:.3f}"``, joined by ``" / "``). The best value of each column and metric is shown in
    gold; with a ``baseline`` (index of a score), its row is underlined and values strictly
    better than the baseline's are bold (without baseline, every value is bold). "Better"
    follows each metric's ``higher_is_better``. ``keep`` (integer indexes, in any order, or a
    boolean mask; e.g. from :func:`topk_evals`) restricts the rows shown, after highlighting.
    Rows are labelled by ``scores_and_layers``: ``(score, layers)`` pairs or plain strings.
    """
    rich.print(
        _summary_table(
            evals,
            scores_and_layers=scores_and_layers,
            keep=keep,
            oods_title=oods_title,
            metrics=metrics,
            baseline=baseline,
        )
    )


# -- plots -------------------------------------------------------------------------------------
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
    names = [_IND_TITLE, *_ood_names(oods_title, len(conf_oods))]
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
    show_convex_hull: bool | None = None,
    **hist_kw: Any,
) -> Figure:
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
        **hist_kw: for the histograms (defaults ``bins=30, stat="density",
            common_norm=False``); ``ax`` is ignored.

    Returns:
        The figure.
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
    return fig


def _optimal_rows(
    evals: FloatArray,
    metrics: Sequence[BaseDiscriminativePower] | None,
    baseline: int | None,
) -> list[int]:
    """Scores reaching the best value of at least one (OoD, metric), plus the baseline."""
    n_scores = evals.shape[0]
    candidates = [i for i in range(n_scores) if i != baseline]
    if not candidates:
        return list(range(n_scores))
    best = _best_values(evals[candidates], _best_is_max(metrics, evals.shape[2]))
    optimal = (evals == best).any(axis=(1, 2))
    return [i for i in range(n_scores) if optimal[i] or i == baseline]


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
    show_convex_hull: bool | None = None,
    **hist_kw: Any,
) -> Figure:
    """:func:`summary_table` (when ``metrics`` are given) then :func:`summary_plot`.

    With ``metrics`` and ``0 < topk <= n_scores``, only the scores in the top ``topk`` of at
    least one (OoD set, metric) are shown (:func:`topk_evals`, higher is better, the
    ``baseline`` always kept), as in the reference; ``topk=0`` (default) shows every score.
    ``optimal_only`` keeps the scores reaching the best value of at least one (OoD set,
    metric) following each metric's ``higher_is_better``; the ``baseline`` score is left out
    of that comparison but always kept. Other arguments are those of the two functions.

    Returns:
        The figure of :func:`summary_plot`.
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
        show_convex_hull=show_convex_hull,
        **hist_kw,
    )
