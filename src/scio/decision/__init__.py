"""Decisions with a guaranteed false-alarm rate: conformal OoD detection.

:class:`ConformalDetector` turns fitted scores into ``reject / accept`` decisions whose
in-distribution rejection rate is at most ``alpha`` (see ``docs/decisions.md``); the pure
math (conformal p-values, Benjamini–Hochberg, p-value combinations) is in
:mod:`scio.decision.pvalues`.
"""

from scio.decision.conformal import MIN_HOLDOUT, ConformalDetector, DetectorFileError
from scio.decision.pvalues import (
    benjamini_hochberg,
    combine_p_values,
    conformal_p_values,
    min_holdout_size,
)

__all__ = [
    "MIN_HOLDOUT",
    "ConformalDetector",
    "DetectorFileError",
    "benjamini_hochberg",
    "combine_p_values",
    "conformal_p_values",
    "min_holdout_size",
]
