"""Softmax (maximum softmax probability) and its alias ``BaselineClassif``."""

from __future__ import annotations

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration

__all__ = ["BaselineClassif", "Softmax"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Softmax(NoCalibration, BaseScoreClassif):
    """Softmax probabilities (Hendrycks & Gimpel, "A Baseline for Detecting Misclassified
    and Out-of-Distribution Examples in Neural Networks", ICLR 2017).

    Idea: a network tends to be less confident on inputs unlike its training data, so the
    predicted class probabilities are themselves a confidence score (the maximum softmax
    probability is the per-class conformity of the predicted class).

    Formula: conformity ``c_j = softmax(z)_j = exp(z_j) / sum_k exp(z_k)`` with ``z`` the
    logits (one value per class).

    Args:
        act_norm: unused (no recorded layer is read).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: nothing at calibration (no forward pass, labels ignored); one plain forward at
    inference. Half precision is computed in float32 and cast back.
    """

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs, dont_record=True)
        return out, torch.softmax(out, dim=1, dtype=_work_dtype(out.dtype)).to(out.dtype)


class BaselineClassif(Softmax):
    """Alias of :class:`Softmax` (the "baseline" of Hendrycks & Gimpel, ICLR 2017)."""
