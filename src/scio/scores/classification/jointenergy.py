"""JointEnergy: sum over classes of the label-wise free energies."""

from __future__ import annotations

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration

__all__ = ["JointEnergy"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class JointEnergy(NoCalibration, BaseScoreClassif):
    """Joint energy (Wang et al., "Can multi-label classification networks know what they
    don't know?", NeurIPS 2021).

    Idea: each logit is read as an independent binary (one-vs-rest) energy model; summing the
    label-wise negative free energies uses the evidence of every class instead of only the
    largest one.

    Formula: conformity = ``sum_c log(1 + exp(z_c))`` (one value per sample, shared by
    every class), computed stably as ``sum_c logaddexp(0, z_c)``.

    Args:
        act_norm: unused (no recorded layer is read).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: nothing at calibration (no forward pass, labels ignored); one plain forward at
    inference. Half precision is computed in float32 and cast back.
    """

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs, dont_record=True)
        logits = out.to(_work_dtype(out.dtype))
        energy = torch.logaddexp(logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        return out, energy.sum(dim=1).to(out.dtype)
