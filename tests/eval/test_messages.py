"""Every failed check of scio.eval says which argument, what was expected and what was given."""

from __future__ import annotations

import numpy as np
import pytest

from scio.eval import AUC, FPR, ROC, TPR


@pytest.mark.parametrize(
    ("labels", "scores", "pattern"),
    [
        ([True, True], [0.1, 0.2], r"`labels` must contain at least one negative .* 2 positives"),
        ([False, False], [0.1, 0.2], r"`labels` must contain at least one positive .* 2 negatives"),
        ([True, False], [0.1, np.nan], r"`scores` must not contain NaN \(got 1 NaN scores\)"),
        ([True, False], [-np.inf, 0.0], r"`scores` must not contain -inf \(got 1 -inf"),
        ([True, False, True], [0.1, 0.2], r"same number of elements \(got 3 labels and 2 scores\)"),
    ],
)
def test_roc_messages(labels: list[bool], scores: list[float], pattern: str) -> None:
    with pytest.raises(AssertionError, match=pattern):
        ROC(labels, scores)


def test_metric_parameter_messages() -> None:
    with pytest.raises(AssertionError, match=r"`tpr` must be a rate in \[0, 1\] \(got 95"):
        FPR(tpr=95)
    with pytest.raises(
        AssertionError, match=r"0 <= min_fpr < max_fpr <= 1 \(got min_fpr=0.0, max_fpr=2\)"
    ):
        AUC(max_fpr=2)
    with pytest.raises(AssertionError, match=r"`max_fpr` must be a rate in \[0, 1\] \(got 1.5\)"):
        TPR(max_fpr=1.5)
    with pytest.raises(AssertionError, match=r"`scores` must not contain NaN"):
        AUC()([True, False], [np.nan, 1.0])
