"""Trust score: distance to the closest other class relative to the predicted class."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from scio.index.bank import (
    ResidualBank,
    append_rows,
    as_dense,
    bank_rows,
    check_bank_params,
    take_rows,
)
from scio.index.index import IndexBackend
from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch, validate_labels
from scio.scores.core.validation import ParamRange, param_ranges
from scio.scores.utils import make_indexes

__all__ = ["Trust"]


class Trust(StreamingCalibration, BaseScoreClassif):
    """Trust score (Jiang, Kim, Guan, Gupta, "To Trust Or Not To Trust A Classifier",
    NeurIPS 2018).

    Idea: a class is trustworthy for an input when the input's features are much closer to
    that class's (filtered) calibration features than to any other class's. Each class
    keeps its calibration features (recorded layers flattened, concatenated,
    ``act_norm``-normalised) minus the fraction ``alpha`` of them lying in the sparsest
    regions (largest distance to their ``k``-th nearest other point of the class), which
    estimates a high-density set of the class.

    Formula: ``d_c`` = Euclidean distance to the nearest kept feature of class ``c``
    (``+inf`` for classes absent from calibration); with ``m1``, ``m2`` the classes of the
    smallest and second smallest distance, ``conformity_c = d_m1 / d_c`` for ``c ≠ m1``
    and ``conformity_m1 = d_m2 / d_m1`` (undefined ratios ``0/0``, ``inf/inf`` → 1).

    Args:
        alpha: fraction of each class removed as low-density points (``0 <= alpha < 1``).
        k: neighbour rank of the density estimate (``0 < k <= n_calib``). When a class has
            ``<= k`` points every density estimate is infinite and the ``int(alpha · n_c)``
            removed points are the first ones of the class (ties kept in calibration order).
        bank_fraction: extension: fraction ``α ∈ (0, 1]`` of the calibration samples kept in
            the bank (a seeded uniform subsample, the KNN paper's α; ``1``: all).
        bank_seed: extension: seed of the bank subsample.
        bank_dtype: extension: bank storage dtype (``"float16"``, ``"bfloat16"``, ...; ``None``:
            the features' dtype); half-precision banks store float16 residuals to a small
            float32 codebook and are searched with float32 accumulation
            (:mod:`scio.index.bank`).
        index_backend: extension, for the per-class density searches: ``"torch"`` (exact,
            default), ``"faiss"`` (exact) or the approximate ``"faiss-ivf"`` /
            ``"faiss-hnsw"`` (see :mod:`scio.index.index`).

    Cost: no extra forward pass; calibration keeps the ``(n_calib, d)`` features and runs
    one self-search per class when ``alpha > 0``; inference is one tiled ``(n, d) x (d,
    n_kept)`` matrix product over the kept features of every class at once, reduced to the
    per-class minimum with ``scatter_reduce`` (no loop over classes).
    """

    alpha: float
    k: int = 10
    bank_fraction: float = 1.0
    bank_seed: int = 0
    bank_dtype: str | None = None
    index_backend: IndexBackend = "torch"

    _extension_params = frozenset({"bank_fraction", "bank_seed", "bank_dtype", "index_backend"})

    _fitted_attrs: ClassVar[tuple[str, ...]] = ("kept_features", "kept_labels", "n_classes")

    #: Bound on the number of query x kept-point distances computed at once.
    _block_elements: ClassVar[int] = 2**24

    _param_ranges = param_ranges(
        alpha=ParamRange.interval(0, 1, low_open=False),
    )

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        check_bank_params(self.bank_fraction, self.bank_dtype, self.index_backend)

    def _calib_update(self, batch: CalibBatch) -> None:
        n_classes = batch.out.shape[1]
        labels = validate_labels(batch.labels, len(batch), n_classes)
        (features,) = self.normalize(batch.activations, concatenate=True)
        append_rows(self._state, "features", features, self.bank_dtype)
        self._state.append("labels", labels.to(features.device))
        self._n_classes = n_classes

    def _calib_end(self) -> None:
        features = take_rows(self._state, "features")
        labels = self._state.cat("labels")
        rows = bank_rows(len(labels), self.bank_fraction, self.bank_seed, labels.device)
        if rows is not None:
            features, labels = features[rows], labels[rows]
        n_classes = self.__dict__.pop("_n_classes")
        keep = torch.ones(len(features), dtype=torch.bool, device=features.device)
        if self.alpha > 0:
            per_class = make_indexes(
                features, labels, n_groups=n_classes, metric="l2", backend=self.index_backend
            )
            for label, index in enumerate(per_class):  # calibration only: one search per class
                n_remove = int(self.alpha * index.ntotal)
                if n_remove == 0:
                    continue
                members = (labels == label).nonzero().squeeze(1)
                queries = as_dense(features[members])
                kth = index.search(queries, self.k, self_query=True)[0][:, -1]
                order = torch.argsort(kth, descending=True, stable=True)
                keep[members[order[:n_remove]]] = False
        self.kept_features: Tensor | ResidualBank = features[keep]
        self.kept_labels: Tensor = labels[keep]
        self.n_classes: int = n_classes

    def _nearest_per_class(self, query: Tensor) -> Tensor:
        """Squared distance from each query to the nearest kept feature of each class."""
        refs = as_dense(self.kept_features).to(query.dtype)
        ref_sq = refs.square().sum(1)
        n = query.shape[0]
        result = query.new_full((n, self.n_classes), math.inf)
        step = max(1, self._block_elements // max(len(refs), 1))
        starts: range | list[int]
        if torch.compiler.is_exporting():  # one block: the batch size stays symbolic
            step, starts = n, [0]
        else:
            starts = range(0, n, step)  # bounded-memory blocks of queries
        for start in starts:
            block = query[start : start + step]
            d2 = (block.square().sum(1, keepdim=True) - 2 * block @ refs.T + ref_sq).clamp_min(0)
            index = self.kept_labels.expand(block.shape[0], -1)
            result[start : start + step].scatter_reduce_(1, index, d2, reduce="amin")
        return result

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        (features,) = self.activations(concatenate=True)
        cdtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        distances = self._nearest_per_class(features.to(cdtype)).sqrt()
        smallest, classes = distances.topk(2, dim=1, largest=False)
        conformity = smallest[:, :1] / distances
        conformity.scatter_(1, classes[:, :1], smallest[:, 1:] / smallest[:, :1])
        conformity = conformity.nan_to_num(nan=1.0, posinf=math.inf, neginf=-math.inf)
        return out, conformity.to(out.dtype)
