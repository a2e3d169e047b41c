"""Implementing your own Discriminative Power metric (the reference points to
``BaseDiscriminativePower`` and ``MCC``).

A metric subclasses :class:`~scio.eval.BaseDiscriminativePower`: hyper-parameters are
annotated class attributes, an optional static ``_check_params(params)`` validates them (at
construction and before every change), and ``from_roc(roc)`` computes the value from a
:class:`~scio.eval.ROC`, whose Pareto front gives the counts ``FP, TP`` (and ``FPR, TPR``...)
of every useful threshold. OoD samples are the positives and should score low.

Here: the best balanced accuracy ``(TPR + TNR) / 2`` over the thresholds, optionally
restricted to thresholds keeping at least ``min_tnr`` of the in-distribution samples.
"""

# %%
from types import SimpleNamespace

import numpy as np

from scio.eval import AUC, MCC, ROC, BaseDiscriminativePower, compute_metrics, summary_table


class BalancedAccuracy(BaseDiscriminativePower):
    """Best ``(TPR + TNR) / 2`` over the thresholds with ``TNR >= min_tnr``."""

    min_tnr: float = 0.0

    @staticmethod
    def _check_params(params: SimpleNamespace) -> None:
        if not 0 <= params.min_tnr <= 1:
            msg = f"`min_tnr` must be a rate in [0, 1] (got {params.min_tnr!r})"
            raise ValueError(msg)

    def from_roc(self, roc: ROC) -> float:
        allowed = self.min_tnr <= roc.TNR
        return float(((roc.TPR + roc.TNR) / 2)[allowed].max(initial=0.0))


# %%
rng = np.random.default_rng(0)
confs_ind = rng.normal(1.0, 1.0, size=(2, 500))  # two scores, 500 InD samples
confs_oods = (rng.normal(-1.0, 1.0, size=(2, 300)), rng.normal(0.5, 2.0, size=(2, 400)))

metrics = (BalancedAccuracy(), BalancedAccuracy(min_tnr=0.95), MCC(), AUC())
evals = compute_metrics(confs_ind, confs_oods, metrics)
summary_table(evals, oods_title=("Shifted", "Wide"), metrics=metrics)
