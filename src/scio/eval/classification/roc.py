"""Receiver Operating Characteristic of an OoD detector (pure numpy).

Convention (as in the rest of :mod:`scio`): a *positive* is an Out-of-Distribution sample
(label ``True``) and must receive a **low** score; the decision rule is ``score <= tau``.

References:
    T. Fawcett, "An introduction to ROC analysis", Pattern Recognition Letters 27(8), 2006.
    F. Provost and T. Fawcett, "Robust classification for imprecise environments",
    Machine Learning 42(3), 2001 (ROC convex hull).
"""

# ruff: noqa: N802  (property names N, P, FPR, TPRch... are part of the API)
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from scio.utils.misc import check

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["ROC"]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def _cross(o: IntArray, a: IntArray, b: IntArray) -> IntArray:
    """z-component of ``(a - o) × (b - o)`` for rows of ``(k, 2)`` integer arrays (exact)."""
    return (a[:, 0] - o[:, 0]) * (b[:, 1] - o[:, 1]) - (a[:, 1] - o[:, 1]) * (b[:, 0] - o[:, 0])


def _upper_hull(points: IntArray) -> IntArray:
    """Indices of the upper convex hull of points with strictly increasing coordinates.

    Collinear points are dropped. Integer coordinates make every orientation test exact.
    Vectorised passes drop, all at once, every point not strictly above the chord of its
    current neighbours (such a point is never a hull vertex); a final monotone chain (Andrew,
    1979) finishes the rare inputs on which those passes shrink the candidate set slowly.
    """
    keep = np.arange(len(points))
    while len(keep) > 2:
        pts = points[keep]
        # > 0: left turn at the middle point, i.e. the middle point is on or below the chord.
        turn = _cross(pts[:-2], pts[1:-1], pts[2:]) >= 0
        n_drop = int(turn.sum())
        if n_drop == 0:
            return keep
        mask = np.ones(len(keep), dtype=bool)
        mask[1:-1] = ~turn
        keep = keep[mask]
        if n_drop * 8 < len(keep):  # slow progress: finish with a single monotone chain
            break
    if len(keep) <= 2:
        return keep
    xy = points[keep].tolist()
    chain: list[int] = []
    for i, (x, y) in enumerate(xy):
        while len(chain) >= 2:
            (x0, y0), (x1, y1) = xy[chain[-2]], xy[chain[-1]]
            if (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0:
                chain.pop()
            else:
                break
        chain.append(i)
    return keep[chain]


class ROC:
    """ROC curve of scores for the detection of positives (OoD, label ``True``) by low score.

    Args:
        labels: 1-D, truthy for positives (OoD samples).
        scores: 1-D, same length; positives should score low. ``+inf`` is allowed, ``NaN``
            and ``-inf`` are not. At least one positive and one negative are required.

    The attainable operating points are ``(FP, TP)`` counts of ``score <= tau`` for every
    ``tau``. The *Pareto front* (:attr:`pareto`) keeps the non-dominated ones (no other point
    has lower ``FP`` and higher ``TP``); :attr:`thresholds` gives, for each of them, the
    half-open interval ``[lo, hi)`` of ``tau`` reaching it. :attr:`pareto_ch` is the upper
    convex hull of the front (operating points reachable by randomising between thresholds).

    Properties ``N, P, tot, FP, TP, FN, TN, FPR, TPR, FNR, TNR`` describe the front, and the
    same names suffixed with ``ch`` (``FPch``, ``TPRch``...) the convex hull.
    """

    def __init__(self, labels: npt.ArrayLike, scores: npt.ArrayLike) -> None:
        labels_arr = np.asarray(labels).astype(bool).ravel()
        scores_arr = np.asarray(scores, dtype=np.float64).ravel()
        check(
            labels_arr.shape == scores_arr.shape,
            "`labels` and `scores` must have the same number of elements (got "
            f"{labels_arr.size} labels and {scores_arr.size} scores)",
        )
        # As in the reference, these four checks raise an AssertionError with an empty
        # message (its tests pin it): the traceback shows the failed line, which says why.
        check(labels_arr.any())  # `labels` needs at least one positive (OoD, True) label
        check(not labels_arr.all())  # `labels` needs at least one negative (InD, False) label
        check(not np.isnan(scores_arr).any())  # `scores` must not contain NaN
        check(not np.isneginf(scores_arr).any())  # `scores` must not contain -inf (+inf is ok)

        order = np.argsort(scores_arr, kind="stable")
        sorted_scores = scores_arr[order]
        sorted_labels = labels_arr[order]
        self._scores = sorted_scores
        self._labels = sorted_labels

        # Last index of each group of tied scores, then cumulative counts up to it.
        last = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
        tp = np.cumsum(sorted_labels, dtype=np.int64)[last]
        fp = (last + 1) - tp
        values = sorted_scores[last]
        attainable = np.zeros((len(last) + 1, 2), dtype=np.int64)
        attainable[1:, 0] = fp
        attainable[1:, 1] = tp
        self._attainable = attainable
        # Interval of tau reaching attainable point j: [values[j-1], values[j]).
        lows = np.concatenate(([-np.inf], values))
        highs = np.concatenate((values, [np.inf]))

        # Pareto front: next point adds a negative, and this point added a positive.
        fp_all, tp_all = attainable[:, 0], attainable[:, 1]
        next_fp_larger = np.append(fp_all[1:] > fp_all[:-1], True)
        tp_larger_than_prev = np.insert(tp_all[1:] > tp_all[:-1], 0, True)
        on_front = next_fp_larger & tp_larger_than_prev
        self._pareto = attainable[on_front]
        self._thresholds = np.stack((lows[on_front], highs[on_front]), axis=1)

        hull = _upper_hull(self._pareto)
        self._pareto_ch = self._pareto[hull]
        self._thresholds_ch = self._thresholds[hull]

    # -- raw data ------------------------------------------------------------------------------
    @property
    def labels(self) -> npt.NDArray[np.bool_]:
        """Labels sorted by increasing score (stable)."""
        return self._labels

    @property
    def scores(self) -> FloatArray:
        """Scores sorted increasingly."""
        return self._scores

    @property
    def attainable(self) -> IntArray:
        """All attainable ``(FP, TP)`` points, ``(0, 0)`` first, one per distinct score."""
        return self._attainable

    @property
    def pareto(self) -> IntArray:
        """Pareto-optimal ``(FP, TP)`` points ``(m, 2)``, sorted; ``FP`` starts at 0, ``TP``
        ends at :attr:`P`."""
        return self._pareto

    @property
    def thresholds(self) -> FloatArray:
        """``(m, 2)``: for each Pareto point, the ``[lo, hi)`` interval of ``tau`` giving it."""
        return self._thresholds

    @property
    def pareto_ch(self) -> IntArray:
        """Vertices of the upper convex hull of :attr:`pareto` (collinear points removed)."""
        return self._pareto_ch

    @property
    def thresholds_ch(self) -> FloatArray:
        """Threshold intervals of the :attr:`pareto_ch` vertices."""
        return self._thresholds_ch

    # -- counts and rates (Pareto front) -------------------------------------------------------
    @property
    def N(self) -> int:
        """Number of negatives (InD samples)."""
        return int(len(self._labels) - self.P)

    @property
    def P(self) -> int:
        """Number of positives (OoD samples)."""
        return int(self._attainable[-1, 1])

    @property
    def tot(self) -> int:
        """Number of samples."""
        return len(self._labels)

    @property
    def FP(self) -> IntArray:
        """False positives (InD flagged as OoD) along the Pareto front."""
        return self._pareto[:, 0]

    @property
    def TP(self) -> IntArray:
        """True positives (OoD flagged as OoD) along the Pareto front."""
        return self._pareto[:, 1]

    @property
    def FN(self) -> IntArray:
        """False negatives along the Pareto front."""
        return self.P - self.TP

    @property
    def TN(self) -> IntArray:
        """True negatives along the Pareto front."""
        return self.N - self.FP

    @property
    def FPR(self) -> FloatArray:
        """False positive rates along the Pareto front."""
        return self.FP / self.N

    @property
    def TPR(self) -> FloatArray:
        """True positive rates along the Pareto front."""
        return self.TP / self.P

    @property
    def FNR(self) -> FloatArray:
        """False negative rates along the Pareto front."""
        return self.FN / self.P

    @property
    def TNR(self) -> FloatArray:
        """True negative rates along the Pareto front."""
        return self.TN / self.N

    # -- counts and rates (convex hull) --------------------------------------------------------
    @property
    def FPch(self) -> IntArray:
        """False positives along the convex hull."""
        return self._pareto_ch[:, 0]

    @property
    def TPch(self) -> IntArray:
        """True positives along the convex hull."""
        return self._pareto_ch[:, 1]

    @property
    def FNch(self) -> IntArray:
        """False negatives along the convex hull."""
        return self.P - self.TPch

    @property
    def TNch(self) -> IntArray:
        """True negatives along the convex hull."""
        return self.N - self.FPch

    @property
    def FPRch(self) -> FloatArray:
        """False positive rates along the convex hull."""
        return self.FPch / self.N

    @property
    def TPRch(self) -> FloatArray:
        """True positive rates along the convex hull."""
        return self.TPch / self.P

    @property
    def FNRch(self) -> FloatArray:
        """False negative rates along the convex hull."""
        return self.FNch / self.P

    @property
    def TNRch(self) -> FloatArray:
        """True negative rates along the convex hull."""
        return self.TNch / self.N

    # -- display -------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={self.N}, P={self.P}, "
            f"pareto={len(self._pareto)} pts, convex_hull={len(self._pareto_ch)} pts)"
        )

    def plot(self, *, legend: bool = False, ax: Axes | None = None) -> None:
        """Draw the Pareto points, the pessimistic ROC and the convex hull on ``ax``.

        Uses the current axes when ``ax`` is ``None``.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            ax = plt.gca()
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title("ROC curve")
        ax.set_xlabel("False Positive Rate")
        ax.set_ylabel("True Positive Rate")
        ax.plot([0, 1], [0, 1], "--", color="black", lw=0.5)
        # One colour for points, curve and hull, and matplotlib's default legend placement,
        # so figures look like the reference's.
        ax.scatter(
            self.FPR, self.TPR, sizes=(7,), color="tab:blue", label="$(FPR, TPR)$ Pareto front"
        )
        x, y = _pessimistic_path(self.FPR, self.TPR)
        ax.step(x, y, where="post", lw=1.2, color="tab:blue", label="ROC (pessimistic)")
        xch, ych = np.append(self.FPRch, 1.0), np.append(self.TPRch, 1.0)
        ax.fill_between(xch, ych, alpha=0.15, color="tab:blue", label="ROC (convex hull)")
        ax.plot(xch, ych, color="tab:blue", ls=":")
        if legend:
            ax.legend()


def _pessimistic_path(fpr: FloatArray, tpr: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Vertices of the post-step pessimistic ROC from ``(0, 0)`` to ``(1, 1)``."""
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], tpr, [1.0]))
