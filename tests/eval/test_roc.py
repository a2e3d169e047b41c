"""ROC: Pareto front, thresholds, convex hull, properties, checks and plot."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import itertools
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scio.eval import ROC
from scio.eval.classification.roc import _upper_hull

# -- strategies --------------------------------------------------------------------------------


@st.composite
def labelled_scores(draw: st.DrawFn, max_size: int = 40, n_values: int | None = None) -> tuple:
    """Labels with both classes and integer-valued scores (few values: many ties)."""
    n = draw(st.integers(2, max_size))
    labels = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    labels[0], labels[1] = True, False
    high = n_values if n_values is not None else draw(st.integers(1, 2 * n))
    scores = draw(st.lists(st.integers(0, high), min_size=n, max_size=n))
    perm = draw(st.permutations(range(n)))
    return np.array(labels)[perm], np.array(scores, dtype=float)[perm]


def _attainable_bruteforce(labels: np.ndarray, scores: np.ndarray) -> list[tuple[int, int]]:
    points = {(0, 0)}
    for tau in np.unique(scores):
        flagged = scores <= tau
        points.add((int((flagged & ~labels).sum()), int((flagged & labels).sum())))
    return sorted(points)


def _pareto_bruteforce(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    def dominated(p: tuple[int, int]) -> bool:
        return any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in points)

    return sorted(p for p in points if not dominated(p))


def _hull_bruteforce(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A point is a hull vertex iff it is strictly above every chord over it."""
    vertices = []
    for k, (x, y) in enumerate(points):
        above = True
        for (x0, y0), (x1, y1) in itertools.product(points[:k], points[k + 1 :]):
            if (y - y0) * (x1 - x0) <= (y1 - y0) * (x - x0):
                above = False
                break
        if above:
            vertices.append((x, y))
    return vertices


# -- explicit cases ----------------------------------------------------------------------------


def test_trivial_case() -> None:
    roc = ROC([False, True], [0, 1])
    np.testing.assert_array_equal(roc.pareto, [[0, 0], [1, 1]])
    np.testing.assert_array_equal(roc.thresholds, [[-np.inf, 0], [1, np.inf]])
    np.testing.assert_array_equal(roc.pareto_ch, [[0, 0], [1, 1]])
    np.testing.assert_array_equal(roc.thresholds_ch, roc.thresholds)
    assert (roc.N, roc.P, roc.tot) == (1, 1, 2)


def test_perfect_detector() -> None:
    roc = ROC([True, False], [0, 1])
    np.testing.assert_array_equal(roc.pareto, [[0, 1]])
    np.testing.assert_array_equal(roc.thresholds, [[0, 1]])
    np.testing.assert_array_equal(roc.pareto_ch, [[0, 1]])


def test_explicit_values_for_every_property() -> None:
    # sorted: 0:T  1:F  2:F  3:T  4:F   (N=3, P=2)
    roc = ROC([True, False, False, True, False], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(roc.attainable, [[0, 0], [0, 1], [1, 1], [2, 1], [2, 2], [3, 2]])
    np.testing.assert_array_equal(roc.pareto, [[0, 1], [2, 2]])
    np.testing.assert_array_equal(roc.thresholds, [[0, 1], [3, 4]])
    np.testing.assert_array_equal(roc.pareto_ch, [[0, 1], [2, 2]])
    assert (roc.N, roc.P, roc.tot) == (3, 2, 5)
    expected = {
        "FP": [0, 2],
        "TP": [1, 2],
        "FN": [1, 0],
        "TN": [3, 1],
        "FPR": [0, 2 / 3],
        "TPR": [1 / 2, 1],
        "FNR": [1 / 2, 0],
        "TNR": [1, 1 / 3],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(getattr(roc, name), values, err_msg=name)
        np.testing.assert_allclose(getattr(roc, name + "ch"), values, err_msg=name + "ch")
    np.testing.assert_array_equal(roc.scores, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(roc.labels, [True, False, False, True, False])


def test_ties_are_never_split() -> None:
    # sorted: 0:F  1:T  2:T  3:{T, F}   (N=2, P=3)
    roc = ROC([False, True, True, True, False], [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(roc.pareto, [[0, 0], [1, 2], [2, 3]])
    np.testing.assert_array_equal(roc.thresholds, [[-np.inf, 0], [2, 3], [3, np.inf]])
    np.testing.assert_array_equal(roc.pareto_ch, roc.pareto)
    # All tied: a single diagonal step.
    roc = ROC([True, False, True], [5, 5, 5])
    np.testing.assert_array_equal(roc.pareto, [[0, 0], [1, 2]])
    np.testing.assert_array_equal(roc.thresholds, [[-np.inf, 5], [5, np.inf]])


def test_convex_hull_drops_collinear_and_concave_points() -> None:
    # Pareto (0,0) (1,1) (2,2) (3,3) -> collinear: hull is the two end points.
    roc = ROC([False, True] * 3 + [True], [0, 1, 2, 3, 4, 5, 6])
    assert len(roc.pareto) > 2
    np.testing.assert_array_equal(roc.pareto_ch, [roc.pareto[0], roc.pareto[-1]])
    np.testing.assert_array_equal(roc.thresholds_ch, [roc.thresholds[0], roc.thresholds[-1]])


def test_needs_both_classes() -> None:
    with pytest.raises(AssertionError):
        ROC([True, True], [0, 1])
    with pytest.raises(AssertionError):
        ROC([False, False], [0, 1])


def test_nan_and_minus_inf_rejected_plus_inf_allowed() -> None:
    with pytest.raises(AssertionError):
        ROC([True, False], [0, np.nan])
    with pytest.raises(AssertionError):
        ROC([True, False], [-np.inf, 0])
    roc = ROC([True, False, False], [0, np.inf, 1])
    np.testing.assert_array_equal(roc.pareto, [[0, 1]])
    np.testing.assert_array_equal(roc.thresholds, [[0, 1]])


def test_shape_mismatch_rejected() -> None:
    with pytest.raises(AssertionError):
        ROC([True, False], [0, 1, 2])


def test_pathological_hull_cascade() -> None:
    """Concave chain then a high last point: only the ends are on the hull."""
    n = 3000
    x = np.arange(n, dtype=np.int64)
    y = (np.sqrt(x) * 100).astype(np.int64) + x  # strictly increasing, concave
    points = np.stack((x, y), axis=1)
    points = np.vstack((points, [[n, 10**9]]))
    hull = _upper_hull(points)
    np.testing.assert_array_equal(hull, [0, n])


# -- properties --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(labelled_scores())
def test_pareto_and_thresholds_match_bruteforce(case: tuple) -> None:
    labels, scores = case
    roc = ROC(labels, scores)
    attainable = _attainable_bruteforce(labels, scores)
    assert [tuple(p) for p in roc.attainable.tolist()] == attainable
    assert [tuple(p) for p in roc.pareto.tolist()] == _pareto_bruteforce(attainable)
    assert roc.pareto[0, 0] == 0
    assert roc.pareto[-1, 1] == roc.P == labels.sum()
    assert (~labels).sum() == roc.N
    # Every tau of a threshold interval reaches its Pareto point.
    for (fp, tp), (lo, hi) in zip(roc.pareto, roc.thresholds):
        assert lo < hi
        for tau in (lo, np.nextafter(hi, -np.inf)):
            flagged = scores <= tau
            assert ((flagged & ~labels).sum(), (flagged & labels).sum()) == (fp, tp)


@settings(max_examples=150, deadline=None)
@given(labelled_scores())
def test_convex_hull_matches_bruteforce(case: tuple) -> None:
    roc = ROC(*case)
    pareto = [tuple(p) for p in roc.pareto.tolist()]
    assert [tuple(p) for p in roc.pareto_ch.tolist()] == _hull_bruteforce(pareto)
    assert roc.pareto_ch[0].tolist() == roc.pareto[0].tolist()
    assert roc.pareto_ch[-1].tolist() == roc.pareto[-1].tolist()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=300),
)
def test_upper_hull_of_random_chains(steps: list[tuple[int, int]]) -> None:
    points = np.cumsum(np.array([(0, 0), *steps]), axis=0)
    expected = _hull_bruteforce([tuple(p) for p in points.tolist()])
    assert [tuple(p) for p in points[_upper_hull(points)].tolist()] == expected


@settings(max_examples=80, deadline=None)
@given(labelled_scores(), st.randoms(use_true_random=False))
def test_order_invariance(case: tuple, rnd) -> None:  # type: ignore[no-untyped-def]
    labels, scores = case
    perm = list(range(len(labels)))
    rnd.shuffle(perm)
    a, b = ROC(labels, scores), ROC(labels[perm], scores[perm])
    np.testing.assert_array_equal(a.pareto, b.pareto)
    np.testing.assert_array_equal(a.thresholds, b.thresholds)
    np.testing.assert_array_equal(a.pareto_ch, b.pareto_ch)


def test_large_input_is_fast() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    labels = rng.random(n) < 0.5
    scores = rng.normal(size=n) + 0.5 * ~labels
    roc = ROC(labels, scores)
    assert roc.tot == n
    assert np.all(np.diff(roc.FPRch) > 0)


# -- plot --------------------------------------------------------------------------------------


def test_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(60) < 20
    scores = np.round(rng.normal(size=60) + 1.2 * ~labels, 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    assert ROC(labels, scores).plot(legend=True, ax=ax) is None
    assert ax.get_title() == "ROC curve"
    assert ax.get_xlabel() == "False Positive Rate"
    assert ax.get_ylabel() == "True Positive Rate"
    assert ax.get_xlim() == (0, 1)
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == [
        "$(FPR, TPR)$ Pareto front",
        "ROC (pessimistic)",
        "ROC (convex hull)",
    ]
    path = tmp_path / "roc.png"
    fig.savefig(path)
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_on_current_axes_without_legend() -> None:
    fig = plt.figure()
    ROC([False, True, True], [0, 1, 2]).plot()
    assert fig.axes[0].get_legend() is None
    plt.close(fig)


def test_plot_single_colour_and_default_legend_placement() -> None:
    """Like the reference: points, curve and hull all ``tab:blue``; legend at ``"best"``."""
    fig, ax = plt.subplots()
    ROC([False, True, True, False, True], [0.3, 0.1, 0.2, 0.9, 0.5]).plot(legend=True, ax=ax)
    blue = mpl.colors.to_rgba("tab:blue")
    (points,) = ax.collections[:1]
    assert tuple(points.get_facecolor()[0]) == blue
    step, hull = ax.lines[1], ax.lines[2]  # lines[0] is the chance diagonal
    assert mpl.colors.to_rgba(step.get_color()) == blue
    assert step.get_linewidth() == 1.2
    assert mpl.colors.to_rgba(hull.get_color()) == blue
    assert hull.get_linestyle() == ":"
    fill = ax.collections[1]
    assert tuple(fill.get_facecolor()[0][:3]) == blue[:3]
    assert fill.get_alpha() == 0.15
    legend = ax.get_legend()
    assert legend is not None
    assert legend._loc in (0, "best")  # matplotlib's default placement
    plt.close(fig)
