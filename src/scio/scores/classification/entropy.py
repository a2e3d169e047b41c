"""Entropy: negative Shannon entropy of the predicted class distribution."""

from __future__ import annotations

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration

__all__ = ["Entropy", "negative_entropy"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def negative_entropy(logits: Tensor) -> Tensor:
    """``sum_c p_c log p_c`` with ``p = softmax(logits)`` (``(n, C)`` -> ``(n,)``).

    Computed from ``log_softmax`` (so ``p_c = 0`` contributes 0, never NaN), in float32 for
    half precision, and returned in the logits' dtype.
    """
    log_p = torch.log_softmax(logits.to(_work_dtype(logits.dtype)), dim=1)
    return (log_p.exp() * log_p).sum(dim=1).to(logits.dtype)


class Entropy(NoCalibration, BaseScoreClassif):
    """Negative predictive entropy (a classic uncertainty baseline, e.g. Hendrycks & Gimpel,
    ICLR 2017; Lakshminarayanan et al., NeurIPS 2017).

    Idea: a network that hesitates between classes spreads its softmax mass, so the entropy
    of the predicted distribution is higher for inputs unlike its training data.

    Formula: ``p = softmax(z)``, conformity = ``-H(p) = sum_c p_c log p_c`` (in
    ``[-log C, 0]``, one value per sample, shared by every class).

    Args:
        act_norm: unused (no recorded layer is read).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: nothing at calibration (no forward pass, labels ignored); one plain forward at
    inference. Half precision is computed in float32 and cast back.
    """

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs, dont_record=True)
        return out, negative_entropy(out)
