"""Discriminative powers: explicit values, parameter checks, properties vs scikit-learn."""

from __future__ import annotations

from fractions import Fraction
from math import sqrt

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import scio.eval.classification.discriminative_power as dp_module
from scio.eval import (
    AUC,
    AUPR,
    FPR,
    MCC,
    ROC,
    TNR,
    TPR,
    BaseDiscriminativePower,
    DetectionError,
)
from scio.eval.classification.discriminative_power import unambiguous_val
from scio.utils.enums import EnumWithExplicitSupport

F = Fraction

# -- explicit values (spec §6.2) ---------------------------------------------------------------

SPEC_METRICS = (
    AUC(),
    AUC(kind="convex_hull"),
    AUC(min_fpr=1 / 4, max_fpr=3 / 4, kind="convex_hull"),
    MCC(),
    TPR(min_tnr=1 / 4),
    TPR(max_fpr=1 / 4, kind="convex_hull"),
    TNR(min_tpr=1 / 4),
    TNR(max_fnr=1 / 4, kind="convex_hull"),
)
SPEC_CASES = (
    (
        (False, True, True, True, False),
        (0, 1, 2, 3, 3),
        (F(1, 3), F(7, 12), F(5, 8), F(1, 6), F(2, 3), F(1, 3), F(1, 2), F(3, 8)),
    ),
    (
        (True, False, False, True, False),
        (0, 1, 2, 3, 4),
        (F(2, 3), F(5, 6), F(167, 192), sqrt(3 / 8), 1, F(11, 16), 1, F(2, 3)),
    ),
    ((True, False), (0, 1), (1,) * 8),
    ((False, True), (0, 1), (0, F(1, 2), F(1, 2), 0, 0, F(1, 4), 0, F(1, 4))),
)


@pytest.mark.parametrize(("labels", "scores", "expected"), SPEC_CASES)
@pytest.mark.parametrize("index", range(len(SPEC_METRICS)))
def test_spec_explicit_values(labels: tuple, scores: tuple, expected: tuple, index: int) -> None:
    metric = SPEC_METRICS[index]
    assert metric(labels, scores) == pytest.approx(float(expected[index]), abs=1e-12)


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        # FPR@95, AUPR-Out, AUPR-In, DetectionError
        ((False, True, True, True, False), (0, 1, 2, 3, 3), (1, F(53, 90), F(9, 20), F(5, 12))),
        (
            (True, False, False, True, False),
            (0, 1, 2, 3, 4),
            (F(1, 2), F(3, 4), F(29, 36), F(1, 4)),
        ),
        ((True, False), (0, 1), (0, 1, 1, 0)),
        ((False, True), (0, 1), (1, F(1, 2), F(1, 2), F(1, 2))),
    ],
)
def test_extra_metrics_explicit_values(labels: tuple, scores: tuple, expected: tuple) -> None:
    metrics = (FPR(), AUPR(), AUPR(positive="ind"), DetectionError())
    for metric, value in zip(metrics, expected):
        assert metric(labels, scores) == pytest.approx(float(value), abs=1e-12), str(metric)


def test_fpr_convention_on_a_readable_case() -> None:
    # 20 InD scores 1..20, 10 OoD scores 0.5, 1.5, ..., 9.5 (low = OoD).
    ind = np.arange(1, 21, dtype=float)
    ood = np.arange(10) + 0.5
    labels = np.r_[np.zeros(20, bool), np.ones(10, bool)]
    scores = np.r_[ind, ood]
    # Keeping 95 % of InD (19 of 20) allows tau = 1.5: OoD 0.5 and 1.5 caught, 8 accepted.
    assert FPR()(labels, scores) == pytest.approx(0.8)
    # Keeping 50 % of InD: tau < 11, all OoD rejected.
    assert FPR(tpr=0.5)(labels, scores) == 0
    # OpenOOD's reading (InD rejected when 95 % of OoD caught): 1 - TNR(min_tpr=0.95).
    assert 1 - TNR(min_tpr=0.95)(labels, scores) == pytest.approx(9 / 20)


# -- parameters --------------------------------------------------------------------------------


def test_repr_and_str() -> None:
    auc = AUC(max_fpr=0.2)
    assert repr(auc) == "AUC(max_fpr=0.2, min_fpr=0.0, kind='pessimistic')"
    assert str(auc) == "AUC(max_fpr=0.2)"
    assert str(MCC()) == "MCC()"
    assert str(TPR(max_fpr=0.05)) == "TPR(max_fpr=0.05)"
    assert repr(FPR()) == "FPR(tpr=0.95, kind='pessimistic')"
    assert str(AUPR(positive="ind")) == "AUPR(positive='ind')"


@pytest.mark.parametrize(
    "params",
    [{"min_fpr": 0.5, "max_fpr": 0.5}, {"min_fpr": -0.1}, {"max_fpr": 1.1}, {"max_fpr": 0.0}],
)
def test_auc_params_checked_at_init(params: dict) -> None:
    with pytest.raises(AssertionError):
        AUC(**params)


def test_params_checked_on_update_with_future_values() -> None:
    auc = AUC(max_fpr=0.5)
    with pytest.raises(AssertionError):
        auc.min_fpr = 0.5
    assert auc.min_fpr == 0.0
    with pytest.raises(AssertionError):
        auc.set_params(max_fpr=2)
    assert auc.max_fpr == 0.5
    auc.min_fpr = 0.25
    assert auc.params == {"max_fpr": 0.5, "min_fpr": 0.25, "kind": "pessimistic"}
    with pytest.raises(ValueError, match="'nope' is not a valid InterpolationKind"):
        auc.kind = "nope"
    with pytest.raises(AssertionError):
        FPR().tpr = 1.5
    with pytest.raises(AssertionError):
        TPR(max_fpr=-1)
    with pytest.raises(AssertionError):
        AUPR(positive="both")


def test_invalid_kind_at_init() -> None:
    with pytest.raises(
        ValueError,
        match="'linear' is not a valid InterpolationKind. Supported: 'convex_hull', 'pessimistic'",
    ):
        TNR(min_tpr=0.5, kind="linear")


def test_abstract_base() -> None:
    with pytest.raises(TypeError, match="Can't instantiate abstract class BaseDiscriminativePower"):
        BaseDiscriminativePower()  # type: ignore[abstract]


def test_call_uses_from_roc() -> None:
    seen = []

    class NumPositives(BaseDiscriminativePower):
        def from_roc(self, roc: ROC) -> float:
            seen.append(roc)
            return float(roc.P)

    assert NumPositives()([True, False, True], [0, 1, 2]) == 2
    assert isinstance(seen[0], ROC)


def test_custom_check_params_runs_at_init_and_update() -> None:
    class Thresh(BaseDiscriminativePower):
        level: float = 0.5

        @staticmethod
        def _check_params(params) -> None:  # type: ignore[no-untyped-def]
            if params.level > 1:
                raise ValueError("too high")

        def from_roc(self, roc: ROC) -> float:
            return self.level

    with pytest.raises(ValueError, match="too high"):
        Thresh(level=2)
    metric = Thresh()
    with pytest.raises(ValueError, match="too high"):
        metric.level = 3
    del metric.level  # back to the default: checked too, and fine
    assert metric.level == 0.5


@pytest.mark.parametrize(
    ("cls", "names"), [(TPR, ("max_fpr", "min_tnr")), (TNR, ("min_tpr", "max_fnr"))]
)
def test_exactly_one_rule(cls: type, names: tuple[str, str]) -> None:
    labels, scores = (True, False, False, True, False), (0, 1, 2, 3, 4)
    with pytest.raises(
        ValueError, match=f"Specify exactly one of '{names[0]}' or '{names[1]}', not none"
    ):
        cls()(labels, scores)
    with pytest.raises(
        ValueError, match=f"Specify exactly one of '{names[0]}' or '{names[1]}', not both"
    ):
        cls(**{names[0]: 0.2, names[1]: 0.2})(labels, scores)
    both = cls(**{names[0]: 0.25, names[1]: 0.75})(labels, scores)
    assert (
        both == cls(**{names[0]: 0.25})(labels, scores) == cls(**{names[1]: 0.75})(labels, scores)
    )


def test_unambiguous_val() -> None:
    assert unambiguous_val(0.3, None, ("a", "b")) == 0.3
    assert unambiguous_val(None, 0.25, ("a", "b")) == 0.75
    with pytest.raises(ValueError, match="Specify exactly one of 'a' or 'b', not none"):
        unambiguous_val(None, None, ("a", "b"))


@pytest.mark.parametrize(
    "metric", [AUC(), TPR(max_fpr=0.1), TNR(min_tpr=0.9), FPR()], ids=lambda m: type(m).__name__
)
def test_unsupported_kind(monkeypatch: pytest.MonkeyPatch, metric: BaseDiscriminativePower) -> None:
    class PatchedKind(EnumWithExplicitSupport):
        CONVEX_HULL = "convex_hull"
        PESSIMISTIC = "pessimistic"
        NEW = "unexpected"

    monkeypatch.setattr(dp_module, "InterpolationKind", PatchedKind)
    metric.kind = "unexpected"
    name = type(metric).__name__
    with pytest.raises(NotImplementedError, match=f"Unsupported kind of {name}: 'unexpected'"):
        metric([True, False], [0, 1])


# -- properties --------------------------------------------------------------------------------


@st.composite
def labelled_scores(draw: st.DrawFn, ties: bool = True, max_size: int = 60) -> tuple:
    n = draw(st.integers(2, max_size))
    labels = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    labels[0], labels[1] = True, False
    if ties:
        high = draw(st.integers(0, n))
        scores = draw(st.lists(st.integers(0, high), min_size=n, max_size=n))
    else:
        scores = draw(st.permutations(range(n)))
    perm = draw(st.permutations(range(n)))
    return np.array(labels)[perm], np.array(scores, dtype=float)[perm]


def _mann_whitney(labels: np.ndarray, scores: np.ndarray, tie: float) -> float:
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] < neg[None, :]).sum() + tie * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


ALL_METRICS = (
    AUC(),
    AUC(kind="convex_hull"),
    AUC(min_fpr=0.1, max_fpr=0.35),
    AUC(min_fpr=0.1, max_fpr=0.35, kind="convex_hull"),
    MCC(),
    TPR(max_fpr=0.05),
    TPR(min_tnr=0.8, kind="convex_hull"),
    TNR(min_tpr=0.95),
    TNR(max_fnr=0.3, kind="convex_hull"),
    FPR(),
    FPR(tpr=0.8, kind="convex_hull"),
    AUPR(),
    AUPR(positive="ind"),
    DetectionError(),
)


@settings(max_examples=80, deadline=None)
@given(labelled_scores(ties=False))
def test_pessimistic_auc_is_mann_whitney_without_ties(case: tuple) -> None:
    labels, scores = case
    assert AUC()(labels, scores) == pytest.approx(_mann_whitney(labels, scores, 0))


@settings(max_examples=80, deadline=None)
@given(labelled_scores(ties=True))
def test_auc_ordering_with_ties(case: tuple) -> None:
    labels, scores = case
    pessimistic = AUC()(labels, scores)
    halves = _mann_whitney(labels, scores, 0.5)
    assert halves == pytest.approx(roc_auc_score(labels, -scores))
    assert pessimistic == pytest.approx(_mann_whitney(labels, scores, 0))
    assert pessimistic <= halves + 1e-12
    assert halves <= AUC(kind="convex_hull")(labels, scores) + 1e-12
    for a, b in [(0.0, 0.3), (0.2, 0.9), (0.5, 1.0)]:
        assert (
            AUC(min_fpr=a, max_fpr=b)(labels, scores)
            <= AUC(min_fpr=a, max_fpr=b, kind="convex_hull")(labels, scores) + 1e-12
        )


@settings(max_examples=100, deadline=None)
@given(labelled_scores(), st.floats(0.01, 0.99))
def test_partial_auc_is_additive(case: tuple, cut: float) -> None:
    for kind in ("pessimistic", "convex_hull"):
        full = AUC(kind=kind)(*case)
        left = AUC(max_fpr=cut, kind=kind)(*case)
        right = AUC(min_fpr=cut, kind=kind)(*case)
        assert left * cut + right * (1 - cut) == pytest.approx(full, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(labelled_scores(), st.lists(st.floats(0.01, 10), min_size=200, max_size=200))
def test_invariance_to_increasing_transforms(case: tuple, gaps: list[float]) -> None:
    labels, scores = case
    values = np.unique(scores)
    assume(len(values) <= len(gaps))
    new_values = np.cumsum(gaps[: len(values)]) - 50.0  # strictly increasing, arbitrary
    transformed = new_values[np.searchsorted(values, scores)]
    for other in (transformed, np.exp(scores / 7), scores**3 + 2 * scores):
        for metric in ALL_METRICS:
            assert metric(labels, other) == pytest.approx(metric(labels, scores), abs=1e-12), str(
                metric
            )


def _fpr_at_tpr_sklearn(labels: np.ndarray, scores: np.ndarray, tpr: float) -> float:
    """Independent FPR@TPR, InD positive and high score = InD (ODIN convention)."""
    fpr_in, tpr_in, _ = roc_curve(~labels, scores, drop_intermediate=False)
    return float(fpr_in[tpr_in >= tpr].min())


@settings(max_examples=120, deadline=None)
@given(labelled_scores(ties=True) | labelled_scores(ties=False), st.sampled_from([0.95, 0.9, 0.5]))
def test_fpr_matches_sklearn(case: tuple, tpr: float) -> None:
    labels, scores = case
    assert FPR(tpr=tpr)(labels, scores) == pytest.approx(_fpr_at_tpr_sklearn(labels, scores, tpr))
    assert FPR(tpr=tpr)(labels, scores) == pytest.approx(1 - TPR(min_tnr=tpr)(labels, scores))


@settings(max_examples=120, deadline=None)
@given(labelled_scores(ties=True) | labelled_scores(ties=False))
def test_aupr_matches_sklearn_average_precision(case: tuple) -> None:
    labels, scores = case
    assert AUPR()(labels, scores) == pytest.approx(average_precision_score(labels, -scores))
    assert AUPR(positive="ind")(labels, scores) == pytest.approx(
        average_precision_score(~labels, scores)
    )


@settings(max_examples=80, deadline=None)
@given(labelled_scores())
def test_threshold_metrics_match_bruteforce(case: tuple) -> None:
    labels, scores = case
    n_pos, n_neg = labels.sum(), (~labels).sum()
    points = [(0, 0)]
    for tau in np.unique(scores):
        flagged = scores <= tau
        points.append(((flagged & ~labels).sum(), (flagged & labels).sum()))
    fp, tp = np.array(points, dtype=float).T
    fpr, tpr = fp / n_neg, tp / n_pos
    tn, fn = n_neg - fp, n_pos - tp
    den = np.sqrt((tp + fp) * (tn + fn) * n_pos * n_neg)
    mcc = np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1), 0)
    assert MCC()(labels, scores) == pytest.approx(mcc.max())
    assert DetectionError()(labels, scores) == pytest.approx(((fpr + 1 - tpr) / 2).min())
    for x in (0.0, 0.1, 0.5, 0.9):
        assert TPR(max_fpr=x)(labels, scores) == pytest.approx(tpr[fpr <= x].max())
        assert TNR(min_tpr=x)(labels, scores) == pytest.approx(1 - fpr[tpr >= x].min())
    # The convex hull is never below the pessimistic curve.
    for x in (0.05, 0.3, 0.7):
        assert (
            TPR(max_fpr=x, kind="convex_hull")(labels, scores)
            >= TPR(max_fpr=x)(labels, scores) - 1e-12
        )
        assert (
            TNR(min_tpr=x, kind="convex_hull")(labels, scores)
            >= TNR(min_tpr=x)(labels, scores) - 1e-12
        )


def test_higher_is_better_flags() -> None:
    assert AUC.higher_is_better and MCC.higher_is_better and AUPR.higher_is_better
    assert not FPR.higher_is_better and not DetectionError.higher_is_better
    assert "higher_is_better" not in AUC().params
