"""ReAct: clip recorded activations at a calibration percentile."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from scio.index import sketch
from scio.index.sketch import QuantileSummary
from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.core.shaping import check_readout, readout
from scio.scores.core.validation import ParamError, ParamRange, param_ranges
from scio.scores.utils import torch_quantile

__all__ = ["ReAct"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _quantile(values: Tensor, q: float, interpolation: Literal["higher", "lower"]) -> Tensor:
    """Quantile of every element of ``values``, in the dtype of ``values``.

    The rank arithmetic of ``torch_quantile`` is done in the input dtype, which overflows
    for float16 beyond 65504 elements and skips elements in float32 beyond 2**24 elements:
    the selection is therefore made on a float64 copy (exact, the selected value is cast
    back without loss).
    """
    exact = values if values.dtype == torch.float64 else values.to(torch.float64)
    return torch_quantile(exact, q, interpolation=interpolation).to(values.dtype)


def _clipper(low: Tensor | None, high: Tensor) -> Callable[[Tensor], Tensor]:
    """Activation post-processor ``a -> clamp(a, low, high)`` (built at inference only)."""

    def clip(activation: Tensor) -> Tensor:
        device, dtype = activation.device, activation.dtype
        lower = None if low is None else low.to(device=device, dtype=dtype)
        return activation.clamp(min=lower, max=high.to(device=device, dtype=dtype))

    return clip


class ReAct(StreamingCalibration, BaseScoreClassif):
    """ReAct (Sun et al., "ReAct: Out-of-distribution Detection With Rectified
        Activations", NeurIPS 2021).

        Idea: OoD inputs trigger abnormally large activations in the penultimate layers; clipping
        the recorded activations at a high percentile of their in-distribution values removes
        this over-confidence while barely changing in-distribution outputs.

        Formula: at calibration, ``h = quantile(A, percentile / 100)`` (``"higher"``
        interpolation) over **all elements** ``A`` of the (``act_norm``-normalised) calibration
        activations (``l = quantile(A, 1 - percentile / 100)``, ``"lower"`` interpolation, when
        ``symmetric``); at inference every recorded activation ``a`` is replaced by
        ``clamp(a, l, h)`` and conformity ``c_j = softmax(z_clipped)_j`` (the reference), or
    another read-out of the clipped logits (``readout="energy"`` is the ReAct paper's headline
    ReAct + energy).

        Args:
            percentile: clipping percentile, ``0.5 * symmetric < percentile / 100 <= 1``
                (default 90, the paper's value).
            symmetric: also clip from below at the ``100 - percentile`` percentile.
            per_layer: one threshold (pair) per recorded layer, in firing order; otherwise the
                recorded layers are flattened and concatenated (then ``act_norm``-normalised)
                and one threshold is shared by every layer.
            act_norm: normalisation of the calibration activations (thresholds are applied to
                raw activations at inference, as in the reference).
            readout: how the clipped logits are read (extension, see
                :mod:`scio.scores.core.shaping`): ``"softmax"`` (default, the reference),
                ``"energy"``
                (the paper), ``"logit"`` or ``"msp"``.
            mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

        Fitted state: ``clip_high`` (tuple of 0-d tensors, one per threshold set) and
        ``clip_low`` (same, or ``None`` entries when not ``symmetric``).

        Cost: calibration uses the shared recording forward. Thresholds are exact (every
        recorded value kept, ``n_calib * d`` elements, plus a float64 copy for the selection)
        while the kept values fit the exact budget (``scio.index.sketch``: 2**26 values
        per threshold); beyond it they come from a mergeable quantile summary with a certified
        rank error ≤ 1e-4 · n, in bounded memory. Inference: one recorded forward (plain logits
        and the recorded activations), then only the part of the network downstream of the
        first recorded layer is rerun on the clipped activations
        (:meth:`scio.recorder.Recorder.shaped_forward`; a full second forward when the network
        cannot be split there).
    """

    percentile: float = 90.0
    symmetric: bool = False
    per_layer: bool = False
    readout: str = "softmax"

    _extension_params = frozenset({"readout"})

    _fitted_attrs = ("clip_low", "clip_high")
    _param_ranges = param_ranges(percentile=ParamRange.interval(0, 100, high_open=False))

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        if self.symmetric and not self.percentile > 50:
            msg = (
                f"Parameter `percentile` of ReAct must be > 50 with `symmetric=True` "
                f"(got {self.percentile!r})"
            )
            raise ParamError(msg)
        check_readout(self.readout)

    def _calib_update(self, batch: CalibBatch) -> None:
        activations = self.normalize(batch.activations, concatenate=not self.per_layer)
        state = self._state
        for i, activation in enumerate(activations):
            if f"sketch{i}.sizes" not in state:  # empty block list: same state on every rank
                empty = QuantileSummary.exact(activation.new_empty(0))
                sketch.append_summary(state, f"sketch{i}", empty)
            state.append(f"layer{i}", activation.reshape(-1))
            if sketch.kept_numel(state, f"layer{i}") > sketch.EXACT_BUDGET:
                self._compress(i)

    def _compress(self, i: int) -> None:
        """Turn the exactly kept values of threshold set ``i`` into a summary block."""
        state = self._state
        values = sketch.pop_parts(state, f"layer{i}")
        assert values is not None
        block = QuantileSummary.compressed(values, sketch.SUMMARY_SIZE)
        sketch.append_summary(state, f"sketch{i}", block)
        state.append(f"layer{i}", values[:0])
        if sketch.kept_numel(state, f"sketch{i}.values") > sketch.EXACT_BUDGET:  # re-compress
            blocks = sketch.read_summaries(state, f"sketch{i}")
            for field in ("values", "rmin", "rmax", "sizes", "counts"):
                sketch.pop_parts(state, f"sketch{i}.{field}")
            merged = sketch.combine_all(blocks).prune(sketch.SUMMARY_SIZE)
            sketch.append_summary(state, f"sketch{i}", merged)

    def _calib_end(self) -> None:
        """Thresholds from the kept values: exact while at most
        :data:`scio.index.sketch.EXACT_BUDGET` values per threshold set were kept,
        else from a mergeable quantile summary whose certified rank error is at most
        :data:`~scio.index.sketch.RANK_ERROR` ``· n`` (a ``UserWarning`` otherwise).
        """
        q = self.percentile / 100
        highs: list[Tensor] = []
        lows: list[Tensor | None] = []
        i = 0
        state = self._state
        while f"layer{i}" in state:
            blocks = state.cat(f"sketch{i}.counts") if f"sketch{i}.counts" in state else None
            if blocks is None or not bool(blocks.any()):
                values = state.cat(f"layer{i}")
                highs.append(_quantile(values, q, "higher"))
                lows.append(_quantile(values, 1 - q, "lower") if self.symmetric else None)
            else:
                highs.append(self._sketched(i, q, "higher"))
                lows.append(self._sketched(i, 1 - q, "lower") if self.symmetric else None)
            i += 1
        self.clip_high: tuple[Tensor, ...] = tuple(highs)
        self.clip_low: tuple[Tensor | None, ...] = tuple(lows)

    def _sketched(self, i: int, q: float, interpolation: Literal["higher", "lower"]) -> Tensor:
        value, error, n = sketch.threshold(self._state, f"layer{i}", f"sketch{i}", q, interpolation)
        if error > sketch.RANK_ERROR * n:
            warnings.warn(
                f"ReAct threshold #{i} (q={q}) has a certified rank error of {error} among {n} "
                f"values, above the documented {sketch.RANK_ERROR} * n",
                UserWarning,
                stacklevel=4,
            )
        return value

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        activations = tuple(self.rnet.activations.values())
        clippers = [_clipper(low, high) for low, high in zip(self.clip_low, self.clip_high)]
        postproc = clippers if self.per_layer else clippers[0]
        clipped = self.rnet.shaped_forward(inputs, activations, postproc)
        if self.readout == "softmax":
            conformity = torch.softmax(clipped, dim=1, dtype=_work_dtype(clipped.dtype))
            return out, conformity.to(clipped.dtype)
        return out, readout(clipped, self.readout)
