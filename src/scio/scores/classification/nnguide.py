"""NNGuide: energy guided by the similarity to confidence-scaled nearest neighbours."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.core.head import HeadMixin
from scio.scores.utils import Index

__all__ = ["NNGuide", "nnguide_bank", "nnguide_conformity", "nnguide_keep"]

_F64 = torch.float64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return _F64 if dtype == _F64 else torch.float32


def _unit(features: Tensor) -> Tensor:
    x = features.reshape(features.shape[0], -1).to(_compute_dtype(features.dtype))
    return x / x.norm(dim=1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)


def nnguide_bank(features: Tensor, logits: Tensor) -> Tensor:
    """Guide bank entries ``s(x_i) · x_i / ||x_i||`` ``(n, d)``, with the energy confidence
    ``s = logsumexp(z)`` (compute dtype: float32, float64 for float64 inputs)."""
    x = _unit(features)
    return x * torch.logsumexp(logits.to(x.dtype), dim=1, keepdim=True)


def nnguide_keep(start: int, n: int, fraction: float, device: torch.device | None = None) -> Tensor:
    """Mask ``(n,)`` of the samples ``start, …, start + n - 1`` (global positions) kept by the
    systematic subsample of rate ``fraction``: position ``i`` is kept iff
    ``⌊(i + 1) f⌋ > ⌊i f⌋`` (evenly spaced, ``⌊N f⌋`` of ``N``, identical whatever the
    batching)."""
    i = torch.arange(start, start + n, dtype=_F64, device=device)
    return torch.floor((i + 1) * fraction) > torch.floor(i * fraction)


def nnguide_conformity(features: Tensor, logits: Tensor, bank: Tensor, k: int) -> Tensor:
    """NNGuide conformity ``(n,)``: ``logsumexp(z) · mean_{top-k} <x / ||x||, b_j>`` over the
    bank rows ``b_j`` (brute force; the score uses an :class:`~scio.scores.utils.Index`)."""
    x = _unit(features)
    similarity = x @ bank.to(x).T
    guidance = similarity.topk(k, dim=1).values.mean(dim=1)
    return torch.logsumexp(logits.to(x.dtype), dim=1) * guidance


class NNGuide(HeadMixin, StreamingCalibration, BaseScoreClassif):
    """Nearest-neighbour guidance (Park et al., "Nearest Neighbor Guidance for
    Out-of-Distribution Detection", ICCV 2023).

    Idea: a classifier's confidence (the energy) is overconfident far from the data; it is
    multiplied by a guidance term, the similarity of the input's features to its nearest
    neighbours in a bank of calibration features each scaled by its own confidence, which
    is high only near confidently classified in-distribution samples.

    Formula: with ``x`` the head's input features, ``s(x) = logsumexp(z)`` the energy
    confidence and the guide bank ``B = {s(x_i) x_i / ||x_i||}`` over (a subsample of) the
    calibration set, ``g(x) = (1/k) Σ_{top-k j} <x / ||x||, b_j>`` (mean of the ``k`` largest
    inner products) and ``conformity = s(x) · g(x)``, identical for every class.

    Args:
        k: number of neighbours (default 10, as in the paper; ``0 < k ≤`` bank size).
        bank_fraction: fraction of the calibration set kept in the bank, ``0 < f ≤ 1``
            (the paper subsamples the training set for large sets, e.g. ImageNet; default 1:
            the whole calibration set). The subsample is systematic, evenly spaced in
            calibration order (see :func:`nnguide_keep`), so it does not depend on batching;
            shuffle the calibration data for a random subsample. In a distributed fit the
            positions are counted on each rank (each shard is subsampled on its own).
        head: the head's module name (``None``: discovered, see
            :class:`~scio.scores.core.head.HeadMixin`). The logits ``z`` are recomputed from the
            head's input with its weight and bias (one ``d × C`` product): the network
            output for a discovered head, that layer's own output when ``head`` names a
            linear layer that is not the last one.

    Cost: calibration keeps the ``(⌊N f⌋, d)`` bank (float32, float64 for float64 inputs),
    the only head method that keeps features. Inference: one forward and one exact
    inner-product search of the bank (tiled products on the data's device). Fitted state:
    ``index`` (:class:`~scio.scores.utils.Index` over the bank).
    """

    k: int = 10
    bank_fraction: float = 1.0

    _fitted_attrs: ClassVar[tuple[str, ...]] = (*HeadMixin._head_fitted_attrs, "index")

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        fraction = self.bank_fraction
        if not (isinstance(fraction, int | float) and 0 < fraction <= 1):
            msg = f"`bank_fraction` must lie in (0, 1] (got {fraction!r})"
            raise ValueError(msg)

    def _calib_start(self) -> None:
        super()._calib_start()
        self._seen = 0

    def _calib_update(self, batch: CalibBatch) -> None:
        features = self.head_features(batch)
        logits = self.head_logits(features)
        keep = nnguide_keep(self._seen, len(batch), float(self.bank_fraction), features.device)
        self._seen += len(batch)
        if bool(keep.all()):
            self._state.append("bank", nnguide_bank(features, logits))
        elif bool(keep.any()):
            self._state.append("bank", nnguide_bank(features[keep], logits[keep]))

    def _calib_end(self) -> None:
        self.__dict__.pop("_seen", None)
        if "bank" not in self._state:
            msg = (
                f"`bank_fraction`={self.bank_fraction} keeps no calibration sample in the "
                "guide bank"
            )
            raise ValueError(msg)
        bank = self._state.cat("bank")
        if self.k > len(bank):
            msg = (
                f"`k` must satisfy 0 < k <= {len(bank)}, the guide bank size "
                f"(⌊n_calib · bank_fraction⌋ with bank_fraction={self.bank_fraction}) "
                f"(got k={self.k})"
            )
            raise ValueError(msg)
        index = Index(dim=bank.shape[1], metric="ip")
        index.add(bank)
        self.index: Index = index

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, features = self.head_forward(inputs)
        x = _unit(features)
        guidance = self.index.search(x, self.k)[0].to(x.dtype).mean(dim=1)
        logits = self.head_logits(features)
        conformity = torch.logsumexp(logits.to(x.dtype), dim=1) * guidance
        return out, conformity.to(out.dtype)
