"""Energy: negative free energy of the logits."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration
from scio.scores.core.validation import ParamRange, param_ranges

__all__ = ["Energy"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Energy(NoCalibration, BaseScoreClassif):
    """Energy score (Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020).

    Idea: the logits define an energy-based model whose free energy
    ``E(x) = -T log sum_c exp(z_c / T)`` is lower for in-distribution inputs; unlike the
    maximum softmax probability it is aligned with the input density.

    Formula: conformity = ``-E(x) = T * logsumexp(z / T)`` (one value per sample, shared by
    every class).

    Args:
        temperature: ``T``, with ``0 < T < inf`` (default 1, as in the paper).
        act_norm: unused (no recorded layer is read).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: nothing at calibration (no forward pass, labels ignored); one plain forward at
    inference. Half precision is computed in float32 and cast back.
    """

    temperature: float = 1.0

    _param_ranges = param_ranges(
        temperature=ParamRange.interval(0, math.inf),
    )

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs, dont_record=True)
        logits = out.to(_work_dtype(out.dtype))
        energy = self.temperature * torch.logsumexp(logits / self.temperature, dim=1)
        return out, energy.to(out.dtype)
