"""Scores for classifiers: per-class conformities of shape ``(n, C)`` and ``mode``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from scio.scores.core.base import BaseScore
from scio.utils.enums import ScoreClassifMode, ScoreClassifModeLike

__all__ = ["BaseScoreClassif", "TemplateClassif"]


def _postprocess_conformity(conformity: Tensor, mode: ScoreClassifModeLike) -> Tensor:
    """Apply ``mode`` to per-class conformities.

    ``raw`` returns the same tensor. With ``t1``, ``t2`` the two best classes of a row,
    ``diff`` gives ``c_j - c_t1`` (and ``c_t1 - c_t2`` at ``t1``), ``ratio`` gives
    ``c_j / c_t1`` (and ``c_t1 / c_t2`` at ``t1``, meant for non-negative conformities):
    only the predicted class can be above 0 (diff) or 1 (ratio). Equal entries give exactly
    0 (diff) or, when infinite, 1 (ratio), so an infinite class-independent conformity does
    not become NaN.
    """
    mode = ScoreClassifMode(mode)
    if mode == ScoreClassifMode.RAW:
        return conformity
    top_values, top_idx = conformity.topk(2, dim=1)
    best, second = top_values[:, :1], top_values[:, 1:]
    # Equal entries give exactly 0 (diff) or 1 (ratio) also when infinite, e.g. a broadcast
    # class-independent -inf fallback, instead of inf - inf = NaN.
    if mode == ScoreClassifMode.DIFF:
        result = torch.where(conformity == best, 0.0, conformity - best)
        result.scatter_(1, top_idx[:, :1], torch.where(best == second, 0.0, best - second))
        return result
    if mode == ScoreClassifMode.RATIO:
        infinite = best.isinf()
        result = torch.where(infinite & (conformity == best), 1.0, conformity / best)
        top = torch.where(infinite & (best == second), 1.0, best / second)
        result.scatter_(1, top_idx[:, :1], top)
        return result
    msg = f"Unsupported mode: {mode!r}"
    raise ValueError(msg)


class BaseScoreClassif(BaseScore):
    """Base class of classification scores.

    The network output is assumed to be logits of shape ``(n, C)``. ``get_conformity`` may
    return conformities of shape ``(n, C)``, ``(n, 1)`` or ``(n,)``; class-independent ones
    are broadcast to every class.

    Args:
        mode: ``"raw"`` (conformities as computed), ``"diff"`` or ``"ratio"`` (relative to
            the best other class, see ``_postprocess_conformity``). Changing it keeps the
            score fitted.
    """

    mode: ScoreClassifModeLike = "raw"

    def _on_param_will_be_set(self, attr: str, future_val: Any) -> None:
        if attr == "mode":
            return
        super()._on_param_will_be_set(attr, future_val)

    def confidence(self, inputs: Tensor) -> Tensor:
        """One confidence per input: the conformity at the predicted class ``(n,)``.

        ``out, conformity = score(inputs)`` then ``conformity[i, out[i].argmax()]``, which is
        what ``scio.eval`` ranks; higher means more in-distribution.
        """
        out, conformity = self(inputs)
        return conformity.gather(1, out.argmax(dim=1, keepdim=True)).squeeze(1)

    def _nan_conformity(self, out: Tensor) -> Tensor:
        """NaN conformities ``(n, C)`` for samples that got none (non-finite inputs)."""
        dtype = out.dtype if out.is_floating_point() else torch.get_default_dtype()
        return torch.full(out.shape, math.nan, dtype=dtype, device=out.device)

    def _process(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, conformity = self.get_conformity(inputs)
        if conformity.ndim == 1:
            conformity = conformity.view(-1, 1)
        conformity = conformity.expand(out.shape)
        return out, _postprocess_conformity(conformity, self.mode)


class TemplateClassif(BaseScoreClassif):
    """Starting point for writing your own classification score.

    Copy this class, declare hyper-parameters as annotated class attributes (with a default
    value or without one for required parameters) and implement:

    * ``calibrate(calib_data, calib_labels)``: learn what the score needs. Use
      ``self.rnet(calib_data)`` then ``self.activations()`` for recorded features.
    * ``get_conformity(inputs)``: return ``(out, conformity)`` with ``out`` the network
      output and ``conformity`` of shape ``(n, C)``, ``(n, 1)`` or ``(n,)`` (higher = more
      in-distribution).

    For calibration from batches without concatenating inputs, also mix in
    :class:`scio.scores.core.base.StreamingCalibration` (see ``docs/architecture.md``).
    """

    param_with_a_default_value: str = "default value"
    param_with_no_default_value: int

    def calibrate(self, calib_data: Tensor, calib_labels: Any) -> None:
        raise NotImplementedError

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError
