"""Discriminative powers: scalar metrics of how well scores separate InD from OoD samples.

Every metric follows :mod:`scio`'s convention unless its docstring states otherwise:
**positives are OoD samples** (label ``True``), they should receive **low** scores, and a
sample is flagged OoD when ``score <= tau``. All metrics only depend on the ranking of the
scores, hence are invariant to strictly increasing transforms of them.

``kind`` selects how the ROC curve is read between its Pareto points (see
:class:`~scio.utils.InterpolationKind`): ``"pessimistic"`` uses only thresholds that can
actually be set (a step function), ``"convex_hull"`` also allows randomising between two
thresholds (linear interpolation on the ROC convex hull).

References:
    T. Fawcett, "An introduction to ROC analysis", Pattern Recognition Letters 27(8), 2006.
    D. McClish, "Analyzing a portion of the ROC curve", Medical Decision Making 9(3), 1989.
    B. W. Matthews, "Comparison of the predicted and observed secondary structure of T4
    phage lysozyme", Biochimica et Biophysica Acta 405(2), 1975.
    D. Hendrycks and K. Gimpel, "A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks", ICLR 2017 (AUPR-In/Out).
    S. Liang, Y. Li and R. Srikant, "Enhancing the reliability of out-of-distribution image
    detection in neural networks" (ODIN), ICLR 2018 (FPR at 95% TPR, detection error).
"""

from __future__ import annotations

from abc import abstractmethod
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from scio.eval.classification.roc import ROC
from scio.utils.enums import InterpolationKind, InterpolationKindLike
from scio.utils.misc import check, check_not_abstract
from scio.utils.params import ParamClass

__all__ = [
    "AUC",
    "AUPR",
    "FPR",
    "MCC",
    "TNR",
    "TPR",
    "BaseDiscriminativePower",
    "DetectionError",
    "unambiguous_val",
]


def unambiguous_val(value: float | None, complement: float | None, names: tuple[str, str]) -> float:
    """Return ``value``, given either directly or through ``complement = 1 - value``.

    Exactly one of the two must be given; both are accepted only when they sum exactly
    to 1. Raises ``ValueError`` otherwise, naming the parameters ``names``.
    """
    if value is not None:
        if complement is not None and value + complement != 1:
            msg = f"Specify exactly one of {names[0]!r} or {names[1]!r}, not both"
            raise ValueError(msg)
        return float(value)
    if complement is None:
        msg = f"Specify exactly one of {names[0]!r} or {names[1]!r}, not none"
        raise ValueError(msg)
    return 1 - float(complement)


def _check_kind(kind: Any) -> None:
    InterpolationKind(kind)  # ValueError listing the supported kinds


def _check_rate(rate: Any, name: str = "rate") -> None:
    if rate is not None:
        check(0 <= rate <= 1, f"`{name}` must be a rate in [0, 1] (got {rate!r})")


class BaseDiscriminativePower(ParamClass):
    """Base class of discriminative powers (metrics computed from a :class:`ROC`).

    Subclasses implement :meth:`from_roc` and may define a static ``_check_params(params)``
    (``params`` is a :class:`~types.SimpleNamespace` of all parameter values) raising on
    invalid values. It runs at instantiation and before every parameter change, with the
    future values. ``metric(labels, scores)`` is ``metric.from_roc(ROC(labels, scores))``.

    The class attribute :attr:`higher_is_better` tells summaries which way is better.
    """

    # parameters are validated by ``_check_params`` with the reference's exception types
    _check_annotations: ClassVar[bool] = False

    higher_is_better: ClassVar[bool] = True

    def __new__(cls, *_args: Any, **_params: Any) -> BaseDiscriminativePower:
        check_not_abstract(cls)  # the same message on every Python version
        return super().__new__(cls)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._check_params(SimpleNamespace(**self.params))
        self._params_checked = True

    def _on_param_will_be_set(self, attr: str, future_val: Any) -> None:
        super()._on_param_will_be_set(attr, future_val)
        if self.__dict__.get("_params_checked", False):
            params = self.params
            params[attr] = future_val
            self._check_params(SimpleNamespace(**params))

    @staticmethod
    def _check_params(params: SimpleNamespace) -> None:
        """Raise if ``params`` are invalid (no check by default)."""

    @abstractmethod
    def from_roc(self, roc: ROC) -> float:
        """The metric value for this ROC curve."""

    def __call__(self, labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
        """The metric value for ``scores`` where ``labels`` are truthy for OoD samples."""
        return self.from_roc(ROC(labels, scores))

    def _unsupported_kind(self, kind: InterpolationKind) -> NotImplementedError:
        # the parameter as given (as the reference), not the member's ``(str, Enum)`` str
        del kind
        return NotImplementedError(f"Unsupported kind of {type(self).__name__}: {self.kind!r}")


def _step_integral(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], a: float, b: float
) -> float:
    """Exact integral over ``[a, b]`` of the right-continuous step function through
    ``(x[i], y[i])`` (``x`` increasing from 0, constant ``1`` after the last point)."""
    edges = np.clip(np.append(x, 1.0), a, b)
    return float(np.sum(y * np.diff(edges)))


def _linear_integral(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], a: float, b: float
) -> float:
    """Trapezoid integral over ``[a, b]`` of the linear interpolation of ``(x, y)``."""
    inside = (x > a) & (x < b)
    xs = np.concatenate(([a], x[inside], [b]))
    ys = np.interp(xs, x, y)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2)


class AUC(BaseDiscriminativePower):
    """(Partial) Area Under the ROC Curve, TPR (OoD detected) against FPR (InD rejected).

    The area over ``[min_fpr, max_fpr]`` is divided by ``max_fpr - min_fpr``, so a perfect
    detector scores 1 and a random one 0.5 (no McClish correction). ``kind="pessimistic"``
    integrates exactly the step function through the Pareto points (ties never count as
    correctly ordered: without ties this is the Mann–Whitney statistic);
    ``"convex_hull"`` integrates the ROC convex hull (trapezoid rule).
    """

    max_fpr: float = 1.0
    min_fpr: float = 0.0
    kind: InterpolationKindLike = "pessimistic"

    @staticmethod
    def _check_params(params: SimpleNamespace) -> None:
        check(
            0 <= params.min_fpr < params.max_fpr <= 1,
            "`min_fpr` and `max_fpr` must satisfy 0 <= min_fpr < max_fpr <= 1 (got "
            f"min_fpr={params.min_fpr!r}, max_fpr={params.max_fpr!r})",
        )
        _check_kind(params.kind)

    def from_roc(self, roc: ROC) -> float:
        """Partial AUC of ``roc`` over ``[min_fpr, max_fpr]``, normalised by its width."""
        a, b = float(self.min_fpr), float(self.max_fpr)
        kind = InterpolationKind(self.kind)
        if kind == InterpolationKind.PESSIMISTIC:
            area = _step_integral(roc.FPR, roc.TPR, a, b)
        elif kind == InterpolationKind.CONVEX_HULL:
            area = _linear_integral(roc.FPRch, roc.TPRch, a, b)
        else:
            raise self._unsupported_kind(kind)
        return area / (b - a)


class MCC(BaseDiscriminativePower):
    """Best Matthews Correlation Coefficient over the thresholds of the ROC.

    ``(TP·TN - FP·FN) / sqrt((TP+FP)(TN+FN)·P·N)``, taken as 0 where the denominator is 0,
    maximised over the Pareto points (symmetric in the choice of the positive class).
    """

    def from_roc(self, roc: ROC) -> float:
        """Maximal MCC over the Pareto points of ``roc``."""
        tp, fp = roc.TP.astype(np.float64), roc.FP.astype(np.float64)
        tn, fn = roc.TN.astype(np.float64), roc.FN.astype(np.float64)
        num = tp * tn - fp * fn
        den = np.sqrt((tp + fp) * (tn + fn) * float(roc.P) * float(roc.N))
        mcc = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        return float(mcc.max())


class TPR(BaseDiscriminativePower):
    """True Positive Rate (fraction of OoD detected) at a maximal False Positive Rate.

    Give exactly one of ``max_fpr`` (fraction of InD wrongly rejected) or ``min_tnr``
    (``= 1 - max_fpr``, fraction of InD kept); checked at evaluation. ``"pessimistic"``: TPR
    of the best threshold with ``FPR <= max_fpr`` (compared as ``TNR >= min_tnr`` when
    ``min_tnr`` is the one given, avoiding the rounding of ``1 - min_tnr``);
    ``"convex_hull"``: the hull interpolated at ``max_fpr``.
    """

    max_fpr: float | None = None
    min_tnr: float | None = None
    kind: InterpolationKindLike = "pessimistic"

    @staticmethod
    def _check_params(params: SimpleNamespace) -> None:
        _check_rate(params.max_fpr, "max_fpr")
        _check_rate(params.min_tnr, "min_tnr")
        _check_kind(params.kind)

    def from_roc(self, roc: ROC) -> float:
        """TPR of ``roc`` at ``FPR = max_fpr``."""
        max_fpr = unambiguous_val(self.max_fpr, self.min_tnr, ("max_fpr", "min_tnr"))
        kind = InterpolationKind(self.kind)
        if kind == InterpolationKind.PESSIMISTIC:
            # Compare in the user's own terms: no rounding from ``1 - min_tnr``.
            fpr, tnr = roc.FPR, roc.TNR
            if self.min_tnr is None or self.max_fpr is not None:
                n_ok = np.count_nonzero(fpr <= max_fpr)
            else:
                n_ok = np.count_nonzero(tnr >= self.min_tnr)
            return float(roc.TPR[n_ok - 1])  # FPR increases along the front from 0
        if kind == InterpolationKind.CONVEX_HULL:
            return float(np.interp(max_fpr, roc.FPRch, roc.TPRch))
        raise self._unsupported_kind(kind)


class TNR(BaseDiscriminativePower):
    """True Negative Rate (fraction of InD kept) at a minimal True Positive Rate.

    Give exactly one of ``min_tpr`` (fraction of OoD detected) or ``max_fnr``
    (``= 1 - min_tpr``); checked at evaluation. ``"pessimistic"``: TNR of the first threshold
    with ``TPR >= min_tpr`` (or ``FNR <= max_fnr``, as given); ``"convex_hull"``:
    ``1 - interp(min_tpr, TPRch, FPRch)``.

    ``1 - TNR(min_tpr=0.95)`` is the fraction of InD rejected when 95 % of OoD are caught
    (OpenOOD's "FPR@95"); for the more common reading of "FPR@95" (OoD accepted when 95 % of
    InD are kept, ODIN/Energy/KNN papers) use :class:`FPR`.
    """

    min_tpr: float | None = None
    max_fnr: float | None = None
    kind: InterpolationKindLike = "pessimistic"

    @staticmethod
    def _check_params(params: SimpleNamespace) -> None:
        _check_rate(params.min_tpr, "min_tpr")
        _check_rate(params.max_fnr, "max_fnr")
        _check_kind(params.kind)

    def from_roc(self, roc: ROC) -> float:
        """TNR of ``roc`` at ``TPR = min_tpr``."""
        min_tpr = unambiguous_val(self.min_tpr, self.max_fnr, ("min_tpr", "max_fnr"))
        kind = InterpolationKind(self.kind)
        if kind == InterpolationKind.PESSIMISTIC:
            tpr, fnr = roc.TPR, roc.FNR
            if self.max_fnr is None or self.min_tpr is not None:
                n_ok = np.count_nonzero(tpr >= min_tpr)
            else:
                n_ok = np.count_nonzero(fnr <= self.max_fnr)
            return float(roc.TNR[len(tpr) - n_ok])  # TPR increases along the front to 1
        if kind == InterpolationKind.CONVEX_HULL:
            return float(1 - np.interp(min_tpr, roc.TPRch, roc.FPRch))
        raise self._unsupported_kind(kind)


class FPR(BaseDiscriminativePower):
    """ "FPR@TPR" as in the ODIN, Energy and KNN papers: the fraction of **OoD accepted**
    when a fraction ``tpr`` of **InD is kept** (default: FPR@95%TPR). Lower is better.

    Convention: this metric reads the ROC with **InD as the positive class** (its "TPR" is
    the fraction of InD kept, its "FPR" the fraction of OoD accepted), as those papers do.
    In :mod:`scio`'s OoD-positive terms it is ``1 - TPR(min_tnr=tpr)``. It is *not*
    OpenOOD's "FPR@95" (fraction of InD rejected when 95 % of OoD are caught), which is
    ``1 - TNR(min_tpr=0.95)``.

    ``"pessimistic"``: best threshold keeping at least ``tpr`` of InD (ties are never split,
    matching ``sklearn.metrics.roc_curve`` with InD positive); ``"convex_hull"``: hull
    interpolated at ``1 - tpr``.
    """

    higher_is_better: ClassVar[bool] = False

    tpr: float = 0.95
    kind: InterpolationKindLike = "pessimistic"

    @staticmethod
    def _check_params(params: SimpleNamespace) -> None:
        check(
            0 <= params.tpr <= 1,
            f"`tpr` must be a rate in [0, 1] (got {params.tpr!r}; e.g. 0.95, not 95)",
        )
        _check_kind(params.kind)

    def from_roc(self, roc: ROC) -> float:
        """Fraction of OoD samples accepted when ``tpr`` of InD samples are kept."""
        kind = InterpolationKind(self.kind)
        if kind == InterpolationKind.PESSIMISTIC:
            # Pareto TNR decreases along the front: last point still keeping enough InD.
            tnr = roc.TNR  # decreases along the front, from 1
            return float(1 - roc.TPR[np.count_nonzero(tnr >= self.tpr) - 1])
        if kind == InterpolationKind.CONVEX_HULL:
            return float(1 - np.interp(1 - self.tpr, roc.FPRch, roc.TPRch))
        raise self._unsupported_kind(kind)


class AUPR(BaseDiscriminativePower):
    """Area under the Precision–Recall curve, computed as the average precision
    ``sum_k (R_k - R_{k-1}) · P_k`` over all thresholds (no interpolation; equal to
    ``sklearn.metrics.average_precision_score``).

    ``positive="ood"`` (default, "AUPR-Out"): OoD samples are the positives, detected by
    low scores. ``positive="ind"`` ("AUPR-In"): InD samples are the positives, detected by
    high scores. Unlike AUROC, its value depends on the InD/OoD proportions.
    """

    positive: Literal["ood", "ind"] = "ood"

    @staticmethod
    def _check_params(params: SimpleNamespace) -> None:
        check(params.positive in {"ood", "ind"}, "'positive' must be 'ood' or 'ind'")

    def from_roc(self, roc: ROC) -> float:
        """Average precision of ``roc``'s attainable operating points."""
        fp, tp = roc.attainable[:, 0], roc.attainable[:, 1]
        if self.positive == "ind":
            # Positives are InD flagged by ``score > tau``: complements, highest tau first.
            tp, fp = (roc.N - fp)[::-1], (roc.P - tp)[::-1]
        n_pos = int(tp[-1])
        recall_gain = np.diff(tp) / n_pos
        precision = tp[1:] / (tp[1:] + fp[1:])
        # the exact value is in [0, 1]; clip float round-off (e.g. 1.0000000000000004)
        return float(np.clip(np.sum(recall_gain * precision), 0.0, 1.0))


class DetectionError(BaseDiscriminativePower):
    """Minimal detection error ``min_tau (FPR + FNR) / 2`` (equal InD/OoD priors), as in
    ODIN's evaluation code. Symmetric in the positive class; lower is better (0 perfect,
    0.5 for a useless detector). ``1 - DetectionError()`` is the "detection accuracy" of
    Lee et al. (Mahalanobis, NeurIPS 2018).
    """

    higher_is_better: ClassVar[bool] = False

    def from_roc(self, roc: ROC) -> float:
        """Minimal balanced error over the Pareto points of ``roc``."""
        return float(np.min(roc.FPR + roc.FNR) / 2)
