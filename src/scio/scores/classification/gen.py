"""GEN: generalized entropy of the top predicted class probabilities."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration, ParamError

__all__ = ["GEN", "generalized_entropy"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def generalized_entropy(logits: Tensor, gamma: float, m: int | None = None) -> Tensor:
    """``G_γ(p) = sum_{j <= M} p_(j)^γ (1 - p_(j))^γ`` over the ``M`` largest softmax
    probabilities ``p_(1) >= p_(2) >= ...`` (all classes when ``m`` is ``None``).

    ``(n, C)`` logits -> ``(n,)``, computed in float32 for half precision and returned in
    the logits' dtype. Each term is ``exp(γ (log p_j + log(1 - p_j)))`` with ``log p`` from
    ``log_softmax`` and, for the top class, ``log(1 - p_1) = logsumexp_{k != 1} log p_k``:
    a confident prediction (``1 - p_1`` below the rounding unit) keeps its exact term, to
    which ``γ < 1`` is very sensitive, instead of a rounded ``1 - p_1``.
    """
    log_p = torch.log_softmax(logits.to(_work_dtype(logits.dtype)), dim=1)
    top = log_p.argmax(dim=1, keepdim=True)
    log_rest = torch.log1p(-log_p.exp())
    others = log_p.scatter(1, top, -torch.inf).logsumexp(dim=1, keepdim=True)
    log_rest = log_rest.scatter(1, top, others)
    terms = torch.exp(gamma * (log_p + log_rest))
    if m is not None and m < log_p.shape[1]:
        terms = terms.gather(1, log_p.topk(m, dim=1, sorted=False).indices)
    return terms.sum(dim=1).to(logits.dtype)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _validate(attr: str, value: Any) -> None:
    """Raise ``ParamError`` (a ``ValueError``) naming ``attr`` if ``value`` is invalid."""
    if attr == "gamma":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            msg = f"`gamma` must be a float in (0, 1) (got {value!r})"
            raise ParamError(msg)
        if not 0 < value < 1 or math.isnan(value):
            msg = f"`gamma` must lie in (0, 1) (got {value!r})"
            raise ParamError(msg)
    elif attr == "M" and value is not None and not _is_positive_int(value):
        msg = f"`M` must be None (every class) or an integer >= 1 (got {value!r})"
        raise ParamError(msg)


class GEN(NoCalibration, BaseScoreClassif):
    """Generalized entropy (Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based
    Out-of-Distribution Detection", CVPR 2023).

    Idea: a generalized (Tsallis/Havrda-Charvát-like) entropy of the predicted distribution,
    restricted to its ``M`` largest probabilities, separates in- and out-of-distribution
    inputs better than the Shannon entropy: with ``γ < 1`` it is sharper near certainty and
    the small tail probabilities (noise with many classes) are ignored.

    Formula: ``p = softmax(z)`` sorted decreasingly, conformity =
    ``-G_γ(p) = -sum_{j=1..M} p_(j)^γ (1 - p_(j))^γ`` (one value per sample, shared by every
    class).

    Args:
        gamma: ``γ`` in ``(0, 1)`` (default 0.1, the paper's value).
        M: number of top classes summed (``None``: every class; the paper restricts it on
            many-class data sets such as ImageNet-1K). Must not exceed the number of
            classes (checked at inference).
        act_norm: unused (no recorded layer is read).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: nothing at calibration (no forward pass, labels ignored); one plain forward and
    a top-``M`` at inference. Half precision is computed in float32 and cast back.
    """

    gamma: float = 0.1
    M: int | None = None

    def _check_param_value(self, name: str, value: Any) -> None:
        super()._check_param_value(name, value)  # before any is set (atomic `set_params`)
        _validate(name, value)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        _validate("gamma", self.gamma)
        _validate("M", self.M)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs, dont_record=True)
        if self.M is not None and out.shape[1] < self.M:
            msg = f"`M` must not exceed the number of classes {out.shape[1]} (got M={self.M})"
            raise ValueError(msg)
        return out, -generalized_entropy(out, self.gamma, self.M)
