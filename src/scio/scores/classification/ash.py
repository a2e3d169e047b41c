"""ASH: activation shaping of the penultimate features (prune, binarise or scale)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration, ParamError
from scio.scores.core.head import HeadMixin
from scio.scores.core.shaping import check_readout, readout

__all__ = ["ASH", "ash_shape", "kept_count", "top_sums"]

VARIANTS = ("p", "b", "s")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def kept_count(d: int, percentile: float) -> int:
    """Number of the largest features kept by a per-sample ``percentile``:
    ``K = d - round(d · percentile / 100)`` (round half to even), at least 1."""
    return max(d - round(d * percentile / 100), 1)


def top_sums(features: Tensor, percentile: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(values, indices, s1, s2)``: the top-``K`` features of each row (``K`` from
    :func:`kept_count`), the row sum ``s1`` and the top-``K`` sum ``s2``."""
    k = kept_count(features.shape[1], percentile)
    values, indices = features.topk(k, dim=1)
    return values, indices, features.sum(dim=1), values.sum(dim=1)


def sum_ratio(s1: Tensor, s2: Tensor) -> Tensor:
    """``s1 / s2``, and 1 where ``s2 = 0`` (then, for non-negative features, every feature
    is 0 and the shaped features are 0 whatever the scale)."""
    return torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, 1), 1)


def ash_shape(features: Tensor, percentile: float, variant: str) -> Tensor:
    """ASH of ``(n, d)`` features: the ``K`` largest features of each row are kept, the
    others set to 0; then ``"p"``: kept values unchanged, ``"b"``: every kept value
    replaced by ``s1 / K``, ``"s"``: kept values multiplied by ``exp(s1 / s2)`` (``s1``: sum
    of the row, ``s2``: sum of the kept values). Returned in the features' dtype."""
    values, indices, s1, s2 = top_sums(features, percentile)
    if variant == "b":
        values = (s1 / values.shape[1])[:, None].expand_as(values)
    elif variant == "s":
        values = values * sum_ratio(s1, s2).exp()[:, None]
    elif variant != "p":
        msg = f"`variant` must be one of {VARIANTS} (got {variant!r})"
        raise ValueError(msg)
    return torch.zeros_like(features).scatter_(1, indices, values)


def check_percentile(value: Any) -> None:
    """Raise ``ParamError`` unless ``0 < value < 100``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"`percentile` must be a float in (0, 100) (got {value!r})"
        raise ParamError(msg)
    if math.isnan(value) or not 0 < value < 100:
        msg = f"`percentile` must lie in (0, 100) (got {value!r})"
        raise ParamError(msg)


def shaped_readout(score: Any, out: Tensor, shaped: Tensor, weight: Tensor | None = None) -> Tensor:
    """Conformity read (``score.readout``) from the head's logits on ``shaped`` features
    (already in the working dtype), cast to ``out``'s dtype."""
    w = score.head_weight if weight is None else weight
    bias = score.head_bias
    logits = F.linear(shaped, w.to(shaped.dtype), None if bias is None else bias.to(shaped.dtype))
    return readout(logits, score.readout).to(out.dtype)


class ASH(HeadMixin, NoCalibration, BaseScoreClassif):
    """Activation shaping (Djurisic et al., "Extremely Simple Activation Shaping for
    Out-of-Distribution Detection", ICLR 2023).

    Idea: most of a sample's penultimate activations can be removed without hurting the
    in-distribution prediction, while OoD samples, whose evidence is spread over weaker
    activations, lose much more of their logit mass. Pruning the lowest activations of each
    sample (and rescaling what is left) therefore separates the energies.

    Formula: with ``h`` the head input (penultimate features, ``d`` values), keep the
    ``K = d - round(d · percentile/100)`` largest values of each sample (a per-sample
    percentile), zero the others, then ``"p"``: keep the values (ASH-P), ``"b"``: set
    every kept value to ``s1/K`` (ASH-B), ``"s"``: multiply them by ``exp(s1/s2)`` (ASH-S)
    with ``s1 = sum(h)`` and ``s2`` the sum of the kept values. Conformity = the
    ``readout`` of the head's logits ``W h' + b`` (energy ``logsumexp`` in the paper).

    Args:
        percentile: pruning percentile, ``0 < percentile < 100`` (default 65; the paper
            tunes it per variant and dataset, between 60 and 90).
        variant: ``"s"`` (default), ``"p"`` or ``"b"``.
        readout: how the shaped logits are read, see :mod:`scio.scores.core.shaping`
            (``"energy"`` default, ``"softmax"``, ``"logit"``, ``"msp"``).
        head: module name of the linear head (``None``: discovered after the recorded
            layer, see :class:`~scio.scores.core.head.HeadMixin`).
        act_norm: unused (the head input is read raw).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    ``out`` is the plain network output. Record the layer before the head (e.g. the
    pooled features); the shaping is applied to the head's input, the paper's setting for
    the penultimate layer. The paper assumes non-negative (post-ReLU) features.

    Cost: calibration only finds the head (one probe forward on two inputs). Inference:
    one forward (the head input is tapped), a per-sample top-``K`` and one extra head
    product ``(n × d)·(d × C)``. Half precision is computed in float32 and cast back.
    """

    percentile: float = 65.0
    variant: str = "s"
    readout: str = "energy"

    _fitted_attrs: ClassVar[tuple[str, ...]] = HeadMixin._head_fitted_attrs

    def _check_param_value(self, name: str, value: Any) -> None:
        super()._check_param_value(name, value)  # before any is set (atomic `set_params`)
        _validate(name, value)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        for attr in ("percentile", "variant", "readout"):
            _validate(attr, getattr(self, attr))

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, features = self.head_forward(inputs)
        shaped = ash_shape(features.to(work_dtype(features.dtype)), self.percentile, self.variant)
        return out, shaped_readout(self, out, shaped)


def _validate(attr: str, value: Any) -> None:
    if attr == "percentile":
        check_percentile(value)
    elif attr == "variant" and value not in VARIANTS:
        msg = f"`variant` must be one of {VARIANTS} (got {value!r})"
        raise ParamError(msg)
    elif attr == "readout":
        check_readout(value)
