"""Read-outs of (shaped) logits, shared by the activation-shaping scores.

Activation shaping (ReAct's clipping, ASH, SCALE) and weight sparsification (DICE) change
the forward pass; which logit score then reads the shaped logits is a separate choice. The
papers use the energy; the reference's ReAct uses the softmax. Every shaping score takes a
``readout`` hyper-parameter naming one of :data:`READOUTS`, so e.g. "ReAct + energy" is
``ReAct(readout="energy")`` and "ASH + softmax" is ``ASH(readout="softmax")``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["READOUTS", "check_readout", "readout"]

#: Supported read-outs: ``"energy"`` ``logsumexp(z)`` (one value per sample), ``"softmax"``
#: ``softmax(z)`` (per class), ``"logit"`` ``z`` (per class), ``"msp"`` ``max softmax(z)``.
READOUTS = ("energy", "softmax", "logit", "msp")


def check_readout(kind: object, *, name: str = "readout") -> str:
    """Return ``kind`` if it is a supported read-out, else raise ``ValueError``."""
    if kind not in READOUTS:
        msg = f"`{name}` must be one of {READOUTS} (got {kind!r})"
        raise ValueError(msg)
    return str(kind)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def readout(logits: Tensor, kind: str) -> Tensor:
    """Conformity read from ``logits`` (``(n, C)``), in the logits' dtype.

    Half precision is computed in float32 and cast back.
    """
    check_readout(kind)
    if kind == "logit":
        return logits
    work = logits.to(_work_dtype(logits.dtype))
    if kind == "energy":
        result = torch.logsumexp(work, dim=1)
    elif kind == "softmax":
        result = torch.softmax(work, dim=1)
    else:
        result = torch.softmax(work, dim=1).amax(dim=1)
    return result.to(logits.dtype)
