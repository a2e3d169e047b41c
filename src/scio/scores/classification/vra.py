"""VRA: rectify the penultimate features between two calibration percentiles."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from scio.index import sketch
from scio.index.sketch import QuantileSummary
from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.core.head import HeadMixin
from scio.scores.core.shaping import READOUTS, readout
from scio.scores.core.validation import ParamRange, param_ranges
from scio.scores.utils import torch_quantile

__all__ = ["VRA", "vra_conformity", "vra_thresholds"]

_F64 = torch.float64


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def vra_thresholds(values: Tensor, percentile_low: float, percentile_high: float) -> Tensor:
    """``(low, high)`` float64: the two percentiles of every element of ``values``, with
    linear interpolation between order statistics (``numpy.percentile``'s default)."""
    flat = values.detach().reshape(-1).to(_F64)
    return torch.stack(
        [
            torch_quantile(flat, p / 100, interpolation="linear")
            for p in (percentile_low, percentile_high)
        ]
    )


def vra_conformity(
    features: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    thresholds: Tensor,
    kind: str = "energy",
) -> Tensor:
    """VRA conformity: the ``kind`` read-out (:func:`scio.scores.core.shaping.readout`) of
    the head's logits on the features clamped into ``[low, high]`` (working dtype: float32
    for half precision)."""
    work = _work_dtype(features.dtype)
    x = features.reshape(features.shape[0], -1).to(work)
    low, high = thresholds.to(device=x.device, dtype=work)
    clipped = x.clamp(min=low, max=high)
    w = weight.detach().to(work)
    logits = torch.nn.functional.linear(
        clipped, w, None if bias is None else bias.detach().to(work)
    )
    return readout(logits, kind)


class VRA(HeadMixin, StreamingCalibration, BaseScoreClassif):
    """Variational rectified activation (Xu et al., "VRA: Variational Rectified Activation
    for Out-of-distribution Detection", NeurIPS 2023), as OpenOOD's ``vra`` postprocessor.

    Idea: a variational analysis of the activation function that best separates
    in-distribution from OoD energies shows that abnormally high *and* abnormally low
    penultimate activations should be suppressed (ReAct only clips the high ones). VRA
    rectifies the features between two in-distribution percentiles before the head.

    Formula: at calibration, ``l`` and ``h`` are the ``percentile_low`` and
    ``percentile_high`` percentiles of **all elements** of the head's input features
    (linear interpolation, as ``numpy.percentile``); at inference
    ``conformity = logsumexp(W clamp(x, l, h) + b)`` (the energy of the rectified logits),
    identical for every class. This is OpenOOD's formula; the paper's piecewise function
    sets activations below ``l`` to 0 instead of ``l`` and may also shift the middle range
    up, and the authors' code takes per-dimension quantiles.

    Args:
        percentile_high: upper percentile, ``0 ≤ percentile_low ≤ percentile_high ≤ 100``
            (default 90, OpenOOD's).
        percentile_low: lower percentile (default 10, OpenOOD's).
        readout: extension: how the rectified logits are read, see
            :mod:`scio.scores.core.shaping` (``"energy"`` default, OpenOOD's and the paper's;
            ``"softmax"``, ``"logit"``, ``"msp"``).
        head: the head's module name (``None``: discovered, see
            :class:`~scio.scores.core.head.HeadMixin`).
        act_norm: unused (the head input is read raw).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Each parameter is checked on assignment (percentiles in ``[0, 100]``), the order of
    the percentiles at fit. Changing ``readout`` keeps the score fit.

    Cost: calibration keeps every feature value while they fit
    :data:`scio.index.sketch.EXACT_BUDGET` (exact percentiles), beyond it a mergeable
    quantile summary (certified rank error ≤ 1e-4 · n, a ``UserWarning`` otherwise).
    Inference: one forward (the head input is tapped), a clamp and one extra head product
    ``(n × d)·(d × C)``. Fitted state: ``thresholds`` (float64 ``(low, high)``).
    """

    percentile_high: float = 90.0
    percentile_low: float = 10.0
    readout: str = "energy"

    _extension_params = BaseScoreClassif._extension_params | {"readout"}
    _param_ranges = param_ranges(
        percentile_high=ParamRange.interval(0, 100, closed="both"),
        percentile_low=ParamRange.interval(0, 100, closed="both"),
        readout=ParamRange(lambda value: value in READOUTS, f"one of {READOUTS}"),
    )

    _fitted_attrs: ClassVar[tuple[str, ...]] = (*HeadMixin._head_fitted_attrs, "thresholds")

    def _on_param_will_be_set(self, attr: str, future_val: Any) -> None:
        if attr == "readout":  # a pure read-out: the score stays fit
            return
        super()._on_param_will_be_set(attr, future_val)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)  # each parameter's range
        if self.percentile_low > self.percentile_high:
            msg = (
                "`percentile_low` must not exceed `percentile_high` (got "
                f"percentile_low={self.percentile_low!r}, percentile_high={self.percentile_high!r})"
            )
            raise ParamError(msg)

    # -- calibration: every feature value, or a quantile summary past the exact budget --------
    def _calib_update(self, batch: CalibBatch) -> None:
        values = self.head_features(batch).reshape(-1)
        state = self._state
        if "sketch.sizes" not in state:  # empty block list: same state on every rank
            sketch.append_summary(state, "sketch", QuantileSummary.exact(values.new_empty(0)))
        state.append("values", values)
        if sketch.kept_numel(state, "values") > sketch.EXACT_BUDGET:
            self._compress()

    def _compress(self) -> None:
        """Turn the exactly kept values into one more summary block."""
        state = self._state
        values = sketch.pop_parts(state, "values")
        assert values is not None
        sketch.append_summary(
            state, "sketch", QuantileSummary.compressed(values, sketch.SUMMARY_SIZE)
        )
        state.append("values", values[:0])
        if sketch.kept_numel(state, "sketch.values") > sketch.EXACT_BUDGET:  # re-compress
            blocks = sketch.read_summaries(state, "sketch")
            for field in ("values", "rmin", "rmax", "sizes", "counts"):
                sketch.pop_parts(state, f"sketch.{field}")
            merged = sketch.combine_all(blocks).prune(sketch.SUMMARY_SIZE)
            sketch.append_summary(state, "sketch", merged)

    def _calib_end(self) -> None:
        state = self._state
        low, high = self.percentile_low, self.percentile_high
        if not bool(state.cat("sketch.counts").any()):
            self.thresholds: Tensor = vra_thresholds(state.cat("values"), low, high)
            return
        self.thresholds = torch.stack([self._sketched(low / 100), self._sketched(high / 100)])

    def _sketched(self, q: float) -> Tensor:
        """Linearly interpolated ``q``-quantile from the summary (two order statistics)."""
        below, error_low, n = sketch.threshold(self._state, "values", "sketch", q, "lower")
        above, error_high, _ = sketch.threshold(self._state, "values", "sketch", q, "higher")
        error = max(error_low, error_high)
        if error > sketch.RANK_ERROR * n:
            warnings.warn(
                f"VRA threshold (q={q}) has a certified rank error of {error} among {n} values, "
                f"above the documented {sketch.RANK_ERROR} * n",
                UserWarning,
                stacklevel=4,
            )
        position = q * (n - 1)
        weight = position - math.floor(position)
        below, above = below.to(_F64), above.to(_F64)
        return torch.lerp(below, above, torch.tensor(weight, dtype=_F64, device=below.device))

    # -- inference ----------------------------------------------------------------------------
    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, features = self.head_forward(inputs)
        conformity = vra_conformity(
            features, self.head_weight, self.head_bias, self.thresholds, self.readout
        )
        return out, conformity.to(out.dtype)
