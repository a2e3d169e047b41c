"""scio 1.1.1.2's evaluation API: topk_evals, keep=, string labels, topk=; readable figures."""

from __future__ import annotations

import io
import itertools

import matplotlib as mpl

mpl.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from rich.console import Console

from scio.eval import AUC, TPR, compute_metrics, summary, summary_plot, topk_evals
from scio.eval.classification.tables import _summary_table

NAN = np.nan


def _naive_topk(evals: np.ndarray, k: int, baseline: int | None) -> list[int]:
    """Rows with at least one value among the k largest (NaN excluded) of a column."""
    n = len(evals)
    if not 0 < k <= n:
        return list(range(n))
    flat = evals.reshape(n, -1)
    rows = set()
    for col in range(flat.shape[1]):
        candidates = [
            (flat[i, col], i) for i in range(n) if i != baseline and not np.isnan(flat[i, col])
        ]
        values = sorted((v for v, _ in candidates), reverse=True)
        if not values:
            continue
        threshold = values[min(k, len(values)) - 1] if len(values) >= k else -np.inf
        rows |= {i for v, i in candidates if v >= threshold}
    if baseline is not None:
        rows.add(baseline)
    return sorted(rows)


def test_topk_evals_against_naive() -> None:
    evals = np.array(
        [
            [[0.9, 0.1], [0.5, NAN]],
            [[0.8, 0.7], [0.5, 0.2]],
            [[0.2, 0.7], [0.1, 0.3]],
            [[NAN, NAN], [NAN, NAN]],
        ]
    )
    assert topk_evals(evals).tolist() == [0, 1, 2]  # ties (0.7, 0.5) all kept
    for k, baseline in itertools.product(range(-1, 6), (None, 0, 3)):
        expected = _naive_topk(evals, k, baseline)
        assert topk_evals(evals, k, baseline=baseline).tolist() == expected, (k, baseline)
    assert topk_evals(evals, 2, baseline=0).tolist() == [0, 1, 2]
    rng = np.random.default_rng(0)
    for _ in range(20):
        random_evals = np.round(rng.random((6, 3, 2)), 1)
        random_evals[rng.random((6, 3, 2)) < 0.2] = NAN
        for k in (1, 2, 3):
            assert topk_evals(random_evals, k).tolist() == _naive_topk(random_evals, k, None)


def _table_text(**kwargs: object) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(_summary_table(**kwargs))  # type: ignore[arg-type]
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_summary_table_keep_and_string_labels() -> None:
    evals = np.array([[[0.5]], [[0.9]], [[0.7]]])
    text = _table_text(evals=evals, scores_and_layers=["alpha", "beta", "gamma"], keep=[2, 0])
    assert "Evaluation of 2 scores against 1 OoD set and 1 metric" in " ".join(text.split())
    assert "beta" not in text
    assert text.index("gamma") < text.index("alpha")  # indexes may reorder
    mask = _table_text(evals=evals, keep=np.array([False, True, False]))
    assert "Score 2" in mask and "Score 1" not in mask and "Score 3" not in mask
    with pytest.raises(AssertionError, match="boolean `keep` must have shape \\(3,\\)"):
        _table_text(evals=evals, keep=np.array([True, False]))


CONFS_IND = np.random.default_rng(1).normal(size=(5, 80)) + 2
CONFS_OODS = (
    np.random.default_rng(2).normal(size=(5, 60)),
    np.random.default_rng(3).normal(size=(5, 70)) + 1,
)
LABELS = [f"Score with a rather long descriptive name number {i}" for i in range(5)]


def _roc_colors(fig: plt.Figure | None) -> dict[str, str]:
    assert fig is not None
    roc_ax = fig.axes[-2]
    return {line.get_label(): mpl.colors.to_hex(line.get_color()) for line in roc_ax.lines[1:]}


def test_summary_plot_keep_keeps_colours_and_string_labels() -> None:
    full = summary_plot(
        CONFS_IND, CONFS_OODS, scores_and_layers=LABELS, show=False, return_figure=True
    )
    part = summary_plot(
        CONFS_IND, CONFS_OODS, scores_and_layers=LABELS, keep=[3, 1], show=False
    )  # None, as the reference: the figure is pyplot's current one
    assert part is None
    part = plt.gcf()
    colors_full, colors_part = _roc_colors(full), _roc_colors(part)
    assert set(colors_part) == {LABELS[3], LABELS[1]}
    for name, color in colors_part.items():
        assert colors_full[name] == color  # same score, same colour in every figure
    assert len(part.axes) == 2 + 2
    plt.close("all")


def test_summary_topk_prunes_table_and_plot(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = (AUC(), TPR(max_fpr=0.1))
    evals = compute_metrics(CONFS_IND, CONFS_OODS, metrics)
    kept = topk_evals(evals, 1, baseline=0)
    fig = summary(
        CONFS_IND,
        CONFS_OODS,
        scores_and_layers=LABELS,
        metrics=metrics,
        topk=1,
        baseline=0,
        show=False,
        return_figure=True,
    )
    out = " ".join(capsys.readouterr().out.split())
    assert f"Evaluation of {len(kept)} score" in out
    assert fig is not None
    assert len(fig.axes) == len(kept) + 2
    fig_all = summary(  # topk=0: all
        CONFS_IND, CONFS_OODS, metrics=metrics, show=False, return_figure=True
    )
    assert fig_all is not None
    assert len(fig_all.axes) == 5 + 2
    plt.close("all")


def _bboxes_overlap(a: object, b: object) -> bool:
    return bool(a.overlaps(b))  # type: ignore[attr-defined]


def test_summary_plot_readable_with_five_scores() -> None:
    """Size from content: titles do not overlap and the ROC legend covers no ROC panel."""
    fig = summary_plot(
        CONFS_IND, CONFS_OODS, scores_and_layers=LABELS, show=False, return_figure=True
    )
    assert fig is not None
    width, _ = fig.get_size_inches()
    assert width > plt.rcParams["figure.figsize"][0]  # grows with the number of panels
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    hist_axes, roc_axes = fig.axes[:5], fig.axes[5:]
    titles = [ax.title.get_window_extent(renderer) for ax in hist_axes]
    for a, b in itertools.combinations(titles, 2):
        assert not _bboxes_overlap(a, b)
    (legend,) = fig.legends
    legend_box = legend.get_window_extent(renderer)
    for ax in roc_axes:
        assert not _bboxes_overlap(legend_box, ax.get_window_extent(renderer))
    plt.close(fig)
