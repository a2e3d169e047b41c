"""Gram: deviations of Gram-matrix statistics from their class-wise calibration ranges."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch, validate_labels
from scio.scores.core.validation import ParamRange, param_ranges
from scio.utils.enums import LabelKind, LabelKindLike

__all__ = ["Gram"]

#: Memory bound (number of elements) of the intermediate tensors built at once.
_MAX_CHUNK_ELEMENTS = 2**24


def _upcast(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def gram_statistics(activations: Tensor, max_order: int, *, separate_diagonal: bool) -> Tensor:
    """Per-sample Gram statistics of one layer, shape ``(n, max_order · d_p)``.

    Samples of rank 3 are ``channels × spatial`` (``F`` of shape ``(ch, m)``), samples of
    rank 1 or 2 are a single channel. For every order ``p = 1..max_order``,
    ``G_p = |F^p (F^p)^T|^(1/p)`` (element-wise powers, non-finite entries → NaN); the
    statistics of an order are the row sums of the upper triangle of ``G_p`` (diagonal
    included, ``d_p = ch``), or with ``separate_diagonal`` the diagonal followed by the
    strict-upper-triangle row sums (``d_p = 2 ch``). Orders are concatenated (order-major).
    Half precision is computed in float32 (the result stays float32).

    All orders are computed with one batched matrix product over ``(orders, n, ch, m)``
    when it fits in ``_MAX_CHUNK_ELEMENTS`` elements, otherwise by chunks of samples and
    groups of orders.

    Raises:
        ValueError: the samples are not of rank 1, 2 or 3.

    """
    rank = activations.ndim - 1
    if rank not in (1, 2, 3):
        msg = (
            f"Gram score only supports per-sample activations as 1D, 2D or 3D tensors (got {rank}D)"
        )
        raise ValueError(msg)
    n = activations.shape[0]
    dtype = _upcast(activations.dtype)
    if rank == 3:
        feats = activations.reshape(n, activations.shape[1], -1).to(dtype)
    else:
        feats = activations.reshape(n, 1, -1).to(dtype)
    ch, m = feats.shape[1], feats.shape[2]
    per_sample_order = max(1, ch * m + ch * ch)  # powers and Gram matrix of one order
    if torch.compiler.is_exporting():  # one chunk: the batch size stays symbolic
        return _chunk_statistics(feats, max_order, separate_diagonal)
    sample_chunk = max(1, _MAX_CHUNK_ELEMENTS // per_sample_order)
    chunks = [
        _chunk_statistics(feats[i : i + sample_chunk], max_order, separate_diagonal)
        for i in range(0, n, sample_chunk)
    ]
    if not chunks:
        width = max_order * ch * (2 if separate_diagonal else 1)
        return feats.new_zeros((0, width))
    return torch.cat(chunks)


def _chunk_statistics(feats: Tensor, max_order: int, separate_diagonal: bool) -> Tensor:
    """Statistics of ``(n, ch, m)`` features, orders grouped to bound memory."""
    n, ch, m = feats.shape
    if torch.compiler.is_exporting():  # one group: the batch size stays symbolic
        group = max_order
    else:
        group = max(1, min(max_order, _MAX_CHUNK_ELEMENTS // max(1, n * (ch * m + ch * ch))))
    parts = []
    carry: Tensor | None = None  # feats ** (start - 1)
    for start in range(1, max_order + 1, group):
        stop = min(max_order, start + group - 1)
        # F^start, ..., F^stop by cumulative products (cheaper than a general ``pow``)
        if start == stop:
            powers = (feats if carry is None else carry * feats).unsqueeze(0)
        elif torch.compiler.is_exporting():  # the same products, without cumprod (not in ONNX)
            steps = [feats if carry is None else carry * feats]
            for _ in range(stop - start):
                steps.append(steps[-1] * feats)
            powers = torch.stack(steps)
        else:
            powers = feats.unsqueeze(0).expand(stop - start + 1, -1, -1, -1).cumprod(dim=0)
            if carry is not None:
                powers = powers * carry
        carry = powers[-1]
        gram = torch.matmul(powers, powers.transpose(-1, -2)).abs_()  # (g, n, ch, ch)
        p = torch.arange(start, stop + 1, dtype=feats.dtype, device=feats.device)
        gram = gram.pow_(p.reciprocal().view(-1, 1, 1, 1))
        if separate_diagonal:
            diagonal = gram.diagonal(dim1=-2, dim2=-1)
            stats = torch.cat([diagonal, gram.triu(1).sum(dim=-1)], dim=-1)
        else:
            stats = gram.triu().sum(dim=-1)
        # Entries are >= 0 or NaN: a row sum is +inf iff one of its entries is, so mapping
        # +inf statistics to NaN equals mapping non-finite Gram entries to NaN first.
        parts.append(stats.masked_fill(stats == math.inf, math.nan))
    stats = torch.cat(parts)  # (orders, n, d_p)
    return stats.transpose(0, 1).reshape(n, -1)


def _deviation_terms(stats: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Relative deviations of ``stats`` outside ``[low, high]`` (broadcast), non-finite → 0."""
    below = (low - stats) / low.abs()
    above = (stats - high) / high.abs()
    zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
    terms = torch.where(stats < low, below, torch.where(stats > high, above, zero))
    return terms.masked_fill(~terms.isfinite(), 0)


def _deviations(stats: Tensor, lows: Tensor, highs: Tensor) -> Tensor:
    """Deviation of every sample ``(n, d)`` from every class range ``(C, d)`` → ``(n, C)``.

    Computed for all classes at once, by chunks of samples bounding the ``(n, C, d)``
    intermediate to ``_MAX_CHUNK_ELEMENTS`` elements.
    """
    n, d = stats.shape
    n_classes = lows.shape[0]
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, n_classes * d))
    if torch.compiler.is_exporting():  # one chunk: the batch size stays symbolic
        return _deviation_terms(stats[:, None, :], lows, highs).sum(dim=-1)
    out = [
        _deviation_terms(stats[i : i + chunk, None, :], lows, highs).sum(dim=-1)
        for i in range(0, n, chunk)
    ]
    if not out:
        return stats.new_zeros((0, n_classes))
    return torch.cat(out)


def class_nanquantiles(
    values: Tensor, labels: Tensor, n_classes: int, qs: tuple[float, ...]
) -> Tensor:
    """Per-class ``torch.nanquantile`` (linear interpolation) along dim 0 of ``values``.

    Vectorised over classes and features: one sort by value (NaN last), one stable sort by
    label, then the quantiles are read at each class' rank positions. Classes without
    samples get NaN (like an all-NaN column).

    Args:
        values: ``(n, d)`` floating tensor.
        labels: ``(n,)`` int64 labels in ``[0, n_classes)``.
        n_classes: number of classes ``C``.
        qs: quantile levels in ``[0, 1]``.

    Returns:
        ``(len(qs), C, d)`` tensor.

    """
    n, d = values.shape
    device = values.device
    sorted_values, order = values.sort(dim=0)
    _, order2 = labels[order].sort(dim=0, stable=True)
    sorted_values = sorted_values.gather(0, order2)  # class blocks, ascending, NaN last
    counts = torch.bincount(labels, minlength=n_classes)
    starts = (counts.cumsum(0) - counts).unsqueeze(1)  # (C, 1)
    n_valid = torch.zeros((n_classes, d), dtype=torch.int64, device=device)
    n_valid.index_add_(0, labels, (~values.isnan()).to(torch.int64))
    results = []
    for q in qs:
        rank = q * (n_valid - 1).clamp(min=0).to(values.dtype)
        below = rank.floor()
        above = rank.ceil()
        weight = rank - below
        last = max(n - 1, 0)
        lo = sorted_values.gather(0, (starts + below.to(torch.int64)).clamp(0, last))
        hi = sorted_values.gather(0, (starts + above.to(torch.int64)).clamp(0, last))
        result = torch.lerp(lo, hi, weight)
        results.append(result.masked_fill(n_valid == 0, math.nan))
    return torch.stack(results)


class Gram(StreamingCalibration, BaseScoreClassif):
    """Gram-matrix deviations (Sastry & Oore, "Detecting Out-of-Distribution Examples with
    Gram Matrices", ICML 2020).

    Idea: higher-order Gram matrices of feature maps summarise correlations between
    channels; in-distribution samples of a class keep these statistics within the range
    observed on calibration samples of that class, OoD samples deviate from it.

    Formula: for each recorded layer (rank-3 samples are ``channels × spatial``, ranks 1-2
    are one channel) and each order ``p = 1..max_gram_order``,
    ``G_p = |F^p (F^p)^T|^(1/p)`` (element-wise powers); the statistics ``s`` are the row
    sums of the upper triangle of ``G_p`` (diagonal included, or diagonal and strict upper
    triangle separately with ``separate_diagonal``). At calibration, per class ``c`` (the
    network's prediction or the true label, see ``calib_labels``), ``low_c, high_c`` are the
    ``cut_off`` and ``1 - cut_off`` nan-quantiles of ``s``. The deviation of ``s`` from class
    ``c`` is ``Σ_j δ_j`` with ``δ_j = (low_j - s_j)/|low_j|`` below the range,
    ``(s_j - high_j)/|high_j|`` above it, 0 inside (non-finite terms count as 0). With
    ``E_l`` the mean deviation of the calibration samples from their own class at layer
    ``l``, conformity ``= -Σ_l dev_l(c) / E_l`` (NaN → ``-inf``). A class absent from
    calibration has an empty range, hence deviation 0 and conformity 0 (reference
    behaviour).

    Args:
        max_gram_order: highest power ``p`` (``>= 1``).
        cut_off: quantile level of the class ranges (``0 < cut_off < 0.5``).
        separate_diagonal: separate diagonal and off-diagonal statistics.
        calib_labels: ``"pred"`` (network predictions) or ``"true"`` (given labels).

    Cost: no extra forward pass. All orders of a layer come from one batched matrix
    product over ``(orders, n, ch, m)`` (grouped to bound memory). Calibration keeps only
    the per-sample statistics (``(n_calib, max_gram_order · ch)`` per layer, float32 for
    half inputs), never the activations; the fitted state is ``2 · C · d`` values per
    layer. Inference is ``O(n · C · d)`` per layer, vectorised over classes.
    Half precision is computed in float32 (fewer overflows than the reference) and the
    conformity is cast back. Beyond the reference, ``max_gram_order >= 1`` is checked.
    """

    max_gram_order: int = 8
    cut_off: float = 0.1
    separate_diagonal: bool = False
    calib_labels: LabelKindLike = "pred"

    _fitted_attrs = ("lows", "highs", "expected_deviations")

    _param_ranges = param_ranges(
        max_gram_order=ParamRange.interval(1, low_open=False, integer=True),
        cut_off=ParamRange.interval(0, 0.5),
    )

    def _stats(self, activations: tuple[Tensor, ...]) -> list[Tensor]:
        return [
            gram_statistics(a, self.max_gram_order, separate_diagonal=self.separate_diagonal)
            for a in self.normalize(activations)
        ]

    def _calib_update(self, batch: CalibBatch) -> None:
        kind = LabelKind(self.calib_labels)
        out = batch.out
        if kind == LabelKind.PRED:
            labels = out.argmax(dim=1)
        elif kind == LabelKind.TRUE:
            labels = validate_labels(batch.labels, len(batch), out.shape[1])
        else:
            msg = f"Unsupported calib_labels_kind: {kind!r}"
            raise ValueError(msg)
        self._state.append("labels", labels.to(device=out.device, dtype=torch.int64))
        self._n_classes = int(out.shape[1])
        for i, stats in enumerate(self._stats(batch.activations)):
            self._state.append(f"stats{i}", stats)

    def _calib_end(self) -> None:
        labels = self._state.cat("labels")
        n_classes = self._n_classes
        n_layers = 0
        while f"stats{n_layers}" in self._state:
            n_layers += 1
        if n_layers == 0:
            msg = "Gram score needs at least one recorded layer"
            raise ValueError(msg)
        present = torch.bincount(labels, minlength=n_classes) > 0
        lows, highs, expected = [], [], []
        for i in range(n_layers):
            stats = self._state.cat(f"stats{i}")
            low, high = class_nanquantiles(
                stats, labels.to(stats.device), n_classes, (self.cut_off, 1 - self.cut_off)
            )
            absent = ~present.to(stats.device).unsqueeze(1)
            low = low.masked_fill(absent, math.inf)
            high = high.masked_fill(absent, -math.inf)
            own = _deviation_terms(stats, low[labels], high[labels]).sum(dim=1)
            lows.append(low)
            highs.append(high)
            expected.append(own.sum() / len(labels))
        self.lows: tuple[Tensor, ...] = tuple(lows)
        self.highs: tuple[Tensor, ...] = tuple(highs)
        self.expected_deviations: Tensor = torch.stack(expected)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        total: Tensor | None = None
        for i, stats in enumerate(self._stats(tuple(self.rnet.activations.values()))):
            low = self.lows[i].to(stats.device)
            high = self.highs[i].to(stats.device)
            layer = _deviations(stats, low, high) / self.expected_deviations[i].to(stats.device)
            total = layer if total is None else total + layer
        assert total is not None
        conformity = torch.where(total.isnan(), -math.inf, 0.0 - total)  # no -0.0
        return out, conformity.to(out.dtype)
