"""Every failed check of scio.eval says which argument, what was expected and what was given."""

from __future__ import annotations

import traceback

import numpy as np
import pytest

from scio.eval import AUC, FPR, ROC, TPR


def test_roc_length_message() -> None:
    with pytest.raises(
        AssertionError, match=r"same number of elements \(got 3 labels and 2 scores\)"
    ):
        ROC([True, False, True], [0.1, 0.2])


@pytest.mark.parametrize(
    ("labels", "scores", "line"),
    [
        ([True, True], [0.1, 0.2], "`labels` needs at least one negative (InD, False) label"),
        ([False, False], [0.1, 0.2], "`labels` needs at least one positive (OoD, True) label"),
        ([True, False], [0.1, np.nan], "`scores` must not contain NaN"),
        ([True, False], [-np.inf, 0.0], "`scores` must not contain -inf"),
    ],
)
def test_roc_input_checks(labels: list[bool], scores: list[float], line: str) -> None:
    """The reference pins an empty message for these four checks; the traceback's source line
    in roc.py says what is wrong."""
    with pytest.raises(AssertionError, match="^$") as info:
        ROC(labels, scores)
    assert line in "".join(traceback.format_exception(info.value))


def test_metric_parameter_messages() -> None:
    with pytest.raises(AssertionError, match=r"`tpr` must be a rate in \[0, 1\] \(got 95"):
        FPR(tpr=95)
    with pytest.raises(
        AssertionError, match=r"0 <= min_fpr < max_fpr <= 1 \(got min_fpr=0.0, max_fpr=2\)"
    ):
        AUC(max_fpr=2)
    with pytest.raises(AssertionError, match=r"`max_fpr` must be a rate in \[0, 1\] \(got 1.5\)"):
        TPR(max_fpr=1.5)
    with pytest.raises(AssertionError, match="^$") as info:
        AUC()([True, False], [np.nan, 1.0])
    assert "`scores` must not contain NaN" in "".join(traceback.format_exception(info.value))
