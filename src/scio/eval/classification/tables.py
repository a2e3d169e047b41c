"""Tables of evaluation results: which scores are best, printed with rich."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import rich
from rich.markup import escape
from rich.table import Table

from scio.eval.classification.discriminative_power import BaseDiscriminativePower
from scio.eval.classification.naming import ScoreClassifAndLayers, _ood_names, _score_names
from scio.utils.misc import HEAVY_HEAD_ROUNDED_BOTTOM, check

__all__ = ["summary_table", "topk_evals"]

FloatArray: TypeAlias = npt.NDArray[np.float64]


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
