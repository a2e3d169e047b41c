"""The outcome of one benchmark run: metrics per score and OoD set, timings, decisions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DECISION_ALPHA", "METRIC_NAMES", "BenchResult"]

METRIC_NAMES = ("AUROC", "FPR@95TPR", "AUPR-In", "AUPR-Out")
DECISION_ALPHA = 0.05  # guaranteed false-alarm rate of the conformal decisions (scio.decision)


@dataclass
class BenchResult:
    """Metrics and timings of one benchmark run."""

    protocol: str
    description: str
    names: list[str]
    layers: list[tuple[str, ...]]
    oods_title: tuple[str, ...]
    evals: np.ndarray  # (n_scores, n_oods, n_metrics)
    fit_s: list[float]
    infer_s: list[float]
    forward_s: float
    n_infer: int
    n_calib: int
    skipped: dict[str, str] = field(default_factory=dict)
    confs_ind: np.ndarray | None = None
    confs_oods: tuple[np.ndarray, ...] = ()
    joint_s: float = math.nan  # wall time of the joint inference of every score
    # (n_scores, 1 + n_oods): measured InD rejection rate, then OoD detection rate per set,
    # of conformal decisions at a guaranteed DECISION_ALPHA false-alarm rate
    decisions: np.ndarray | None = None

    def overhead(self, i: int) -> float:
        """Cost of score ``i`` relative to a plain forward pass: ``(forward + own) /
        forward``, ``own`` being the score's own inference work (its timer) on top of the
        forward it shares with every other score (joint inference)."""
        return (self.forward_s + self.infer_s[i]) / self.forward_s

    def rows(self) -> list[dict[str, Any]]:
        """Long-format rows (one per score × OoD set × metric) for ``results.csv``."""
        rows = []
        for i, name in enumerate(self.names):
            for j, ood in enumerate(self.oods_title):
                for m, metric in enumerate(METRIC_NAMES):
                    rows.append(
                        {
                            "protocol": self.protocol,
                            "score": name,
                            "layers": " ".join(self.layers[i]),
                            "ood": ood,
                            "metric": metric,
                            "value": float(self.evals[i, j, m]),
                            "fit_s": self.fit_s[i],
                            "inference_s": self.infer_s[i],
                            "overhead": self.overhead(i),
                        }
                    )
                if self.decisions is not None:  # OoD detection rate at DECISION_ALPHA
                    rows.append(dict(rows[-1], metric="DR@5%FA", value=self.decisions[i, 1 + j]))
        return rows
