"""Logit (MaxLogit): the raw logits as conformities."""

from __future__ import annotations

from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration

__all__ = ["Logit"]


class Logit(NoCalibration, BaseScoreClassif):
    """Raw logits (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
    Settings", ICML 2022, "MaxLogit").

    Idea: the softmax normalisation discards how large the logits are; unnormalised logits
    (the maximum logit for the predicted class) separate in- from out-of-distribution
    inputs better when there are many classes.

    Formula: conformity ``c_j = z_j`` (the logits themselves).

    Args:
        act_norm: unused (no recorded layer is read).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: nothing at calibration (no forward pass, labels ignored); one plain forward at
    inference. The conformity is a copy of the logits, not the same tensor object.
    """

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs, dont_record=True)
        return out, out.clone()
