"""Evaluation of OoD detection: ROC curves, discriminative powers, benchmark helpers.

Convention: OoD samples are the positives and must receive **low** scores (a sample is
flagged OoD when ``score <= tau``). See :mod:`scio.eval.classification`.
"""

from scio.eval import classification
from scio.eval.classification import (
    AUC,
    AUPR,
    FPR,
    MCC,
    ROC,
    TNR,
    TPR,
    BaseDiscriminativePower,
    DetectionError,
    compute_confidence,
    compute_metrics,
    fit_scores,
    histogram_oods,
    roc_scores,
    summary,
    summary_plot,
    summary_table,
    topk_evals,
)

__all__ = [
    "AUC",
    "AUPR",
    "FPR",
    "MCC",
    "ROC",
    "TNR",
    "TPR",
    "BaseDiscriminativePower",
    "DetectionError",
    "classification",
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
