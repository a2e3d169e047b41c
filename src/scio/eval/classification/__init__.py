"""Evaluation of classification confidence scores: ROC, metrics, tables and plots."""

from scio.eval.classification.benchmark import (
    ScoreClassifAndLayers,
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
from scio.eval.classification.discriminative_power import (
    AUC,
    AUPR,
    FPR,
    MCC,
    TNR,
    TPR,
    BaseDiscriminativePower,
    DetectionError,
)
from scio.eval.classification.roc import ROC

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
    "ScoreClassifAndLayers",
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
