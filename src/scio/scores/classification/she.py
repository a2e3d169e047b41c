"""SHE: simplified Hopfield energy with per-class stored patterns."""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch, validate_labels
from scio.scores.core.head import HeadMixin

__all__ = ["SHE", "she_conformity", "she_templates"]

_F64 = torch.float64
#: ``metric`` values (OpenOOD's ``she`` postprocessor's).
METRICS = ("inner_product", "euclidean", "cosine")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return _F64 if dtype == _F64 else torch.float32


def she_templates(sums: Tensor, counts: Tensor) -> Tensor:
    """Stored patterns ``(C, d)``: per-class mean of the correctly predicted features, from
    their per-class sums ``(C, d)`` and counts ``(C,)``; NaN rows for empty classes."""
    return sums / counts.unsqueeze(1)


def she_conformity(
    logits: Tensor, features: Tensor, templates: Tensor, metric: str = "inner_product"
) -> Tensor:
    """SHE conformity ``(n,)`` with ``ŷ = argmax z``: ``<x, S_ŷ>`` (``"inner_product"``),
    ``-||x - S_ŷ||`` (``"euclidean"``) or ``cos(x, S_ŷ)`` (``"cosine"``, norms clamped at
    ``1e-8``); ``-inf`` where ``S_ŷ`` is undefined. Compute dtype: float32, float64 for
    float64 features."""
    dtype = _compute_dtype(features.dtype)
    x = features.reshape(features.shape[0], -1).to(dtype)
    pattern = templates.to(x)[logits.argmax(dim=1)]
    if metric == "inner_product":
        energy = (x * pattern).sum(dim=1)
    elif metric == "euclidean":
        energy = -(x - pattern).norm(dim=1)
    elif metric == "cosine":
        energy = torch.cosine_similarity(x, pattern, dim=1, eps=1e-8)
    else:
        msg = f"`metric` must be one of {METRICS} (got {metric!r})"
        raise ValueError(msg)
    return energy.masked_fill(energy.isnan(), -math.inf)


class SHE(HeadMixin, StreamingCalibration, BaseScoreClassif):
    """Simplified Hopfield energy (Zhang et al., "Out-of-Distribution Detection based on
    In-Distribution Data Patterns Memorization with Modern Hopfield Energy", ICLR 2023).

    Idea: the penultimate features of correctly classified training samples are memorised
    as one stored pattern per class (their mean); an input's Hopfield energy with the
    pattern of its predicted class, simplified to an inner product, is high for
    in-distribution inputs.

    Formula: with ``x`` the head's input features, ``ŷ = argmax z`` and
    ``S_c = mean {x_i : y_i = c = ŷ_i}`` over calibration, ``conformity = <x, S_ŷ>``,
    identical for every class. This is OpenOOD's ``she`` postprocessor with its default
    ``metric="inner_product"``; the only differences are the fallback below (OpenOOD's
    mean of an empty set gives NaN) and the float64 accumulation of the patterns.

    Classes with no correctly predicted calibration sample have no stored pattern: a
    ``UserWarning`` names them at fit, and inputs predicted as one of them get conformity
    ``-inf`` (documented fallback).

    Args:
        metric: extension: ``"inner_product"`` (default, the paper's), ``"euclidean"``
            (``-||x - S_ŷ||``) or ``"cosine"``, OpenOOD's names. Changing it keeps the
            score fit.
        head: the head's module name (``None``: discovered, see
            :class:`~scio.scores.core.head.HeadMixin`). The logits ``z`` are recomputed from the
            head's input with its weight and bias (one ``d × C`` product): the network
            output for a discovered head, that layer's own output when ``head`` names a
            linear layer that is not the last one.

    Cost: calibration needs labels and keeps float64 per-class running sums (``O(C d)``).
    Inference: one forward, then ``O(n d)``. Fitted state: ``templates`` ``(C, d)``
    (NaN rows for classes without a pattern).
    """

    metric: str = "inner_product"

    _extension_params = BaseScoreClassif._extension_params | {"metric"}

    _fitted_attrs: ClassVar[tuple[str, ...]] = (*HeadMixin._head_fitted_attrs, "templates")

    def _on_param_will_be_set(self, attr: str, future_val: object) -> None:
        if attr == "metric":
            _check_metric(future_val)
            return  # used at inference only: the score stays fit
        super()._on_param_will_be_set(attr, future_val)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        _check_metric(self.metric)

    def _calib_update(self, batch: CalibBatch) -> None:
        features = self.head_features(batch)
        logits = self.head_logits(features)
        n_classes = logits.shape[1]
        labels = validate_labels(batch.labels, len(batch), n_classes).to(logits.device)
        features = features.to(_F64)
        correct = logits.argmax(dim=1) == labels
        ids = labels[correct]
        sums = features.new_zeros((n_classes, features.shape[1]))
        sums.index_add_(0, ids, features[correct])
        self._state.add("sum", sums)
        self._state.add("count", torch.bincount(ids, minlength=n_classes).to(_F64))

    def _calib_end(self) -> None:
        counts = self._state.sum("count")
        empty = (counts == 0).nonzero().squeeze(1).tolist()
        if empty:
            shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
            warnings.warn(
                f"SHE: {len(empty)} class(es) have no correctly predicted calibration "
                f"sample ({shown}): inputs predicted as them get conformity -inf",
                UserWarning,
                stacklevel=2,
            )
        self.templates: Tensor = she_templates(self._state.sum("sum"), counts)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, features = self.head_forward(inputs)
        logits = self.head_logits(features)
        conformity = she_conformity(logits, features, self.templates, self.metric)
        return out, conformity.to(out.dtype)


def _check_metric(value: object) -> None:
    if value not in METRICS:
        msg = f"`metric` must be one of {METRICS} (got {value!r})"
        raise ParamError(msg)
