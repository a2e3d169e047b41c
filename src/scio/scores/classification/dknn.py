"""DkNN: agreement of the labels of nearest calibration neighbours across layers."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from scio.index.bank import append_rows, as_dense, bank_rows, has_rows, take_rows
from scio.index.index import IndexBackend
from scio.scores.classification.base import BaseScoreClassif
from scio.scores.classification.knn import check_bank
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch, validate_labels
from scio.scores.utils import Index, get_aggregator, knn_label_count, make_indexes
from scio.utils.enums import AggrNameLike, IndexMetricLike

__all__ = ["DkNN"]


class DkNN(StreamingCalibration, BaseScoreClassif):
    """Deep k-Nearest Neighbours (Papernot & McDaniel, "Deep k-Nearest Neighbors: Towards
    Confident, Interpretable and Robust Deep Learning", arXiv 2018).

    Idea: at every recorded layer, the ``k`` nearest calibration features of an input
    "vote" for their labels. In-distribution inputs get consistent votes for their class
    across layers. Optionally, votes are turned into conformal p-values: the fraction of
    calibration samples whose own agreement (number of their ``k`` nearest *other*
    calibration neighbours sharing their label) is strictly lower than the input's vote
    count for the class.

    Formula: ``v_l(x, c)`` = number of the ``k`` nearest calibration features of ``x`` at
    layer ``l`` (``act_norm``-normalised, flattened) labelled ``c``.

    * ``per_class = per_layer = False``: ``conformity_c = Σ_l v_l(x, c)`` (total ``k·L``).
    * otherwise, with rows ``r`` = layers (``per_layer``) or a single row of votes summed
      over layers, and ``a_r(i)`` the calibration agreement of sample ``i`` on row ``r``:
      ``p_r(x, c) = #{i ∈ R_c : a_r(i) < v_r(x, c)} / |R_c|`` where ``R_c`` is every
      calibration sample, or only those labelled ``c`` if ``per_class`` (``0`` for an
      absent class); ``conformity_c = aggregation_r p_r(x, c)``.

    Args:
        k: number of neighbours (``0 < k <= n_calib``). If ``k = n_calib``, the calibration
            agreements count the ``n_calib - 1`` other points.
        per_class: compare votes with calibration samples of the same class only.
        per_layer: one p-value per layer, aggregated with ``aggregation``.
        aggregation: name (see :func:`scio.scores.utils.get_aggregator`) or norm order.
        index_metric: ``"l2"`` (squared Euclidean) or ``"ip"`` (inner product).
        bank_fraction: extension: fraction ``α ∈ (0, 1]`` of the calibration samples kept in
            the bank (a seeded uniform subsample, the KNN paper's α; ``1``: all).
        bank_seed: extension: seed of the bank subsample.
        bank_dtype: extension: bank storage dtype (``"float16"``, ``"bfloat16"``, ...; ``None``:
            the features' dtype); half-precision banks store float16 residuals to a small
            float32 codebook and are searched with float32 accumulation
            (:mod:`scio.index.bank`).
        index_backend: extension: ``"torch"`` (exact, default), ``"faiss"`` (exact) or the
            approximate ``"faiss-ivf"`` / ``"faiss-hnsw"`` (see :mod:`scio.index.index`).

    Cost: no extra forward pass; calibration keeps the features of every recorded layer
    (one exact index per layer on the data's device) and, with ``per_class`` or
    ``per_layer``, runs one ``k``-NN self-search per layer; inference runs one ``k``-NN
    search per layer.
    """

    k: int
    per_class: bool = False
    per_layer: bool = False
    aggregation: AggrNameLike | float = "mean"
    index_metric: IndexMetricLike = "l2"
    bank_fraction: float = 1.0
    bank_seed: int = 0
    bank_dtype: str | None = None
    index_backend: IndexBackend = "torch"

    _extension_params = frozenset({"bank_fraction", "bank_seed", "bank_dtype", "index_backend"})

    _fitted_attrs: ClassVar[tuple[str, ...]] = (
        "indexes",
        "labels",
        "n_classes",
        "calib_sorted",
        "class_counts",
    )

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        get_aggregator(self.aggregation)  # unsupported name: the enum's ValueError
        check_bank(self, n_calib)

    @property
    def _uses_p_values(self) -> bool:
        return bool(self.per_class or self.per_layer)

    def _calib_update(self, batch: CalibBatch) -> None:
        n_classes = batch.out.shape[1]
        labels = validate_labels(batch.labels, len(batch), n_classes)
        for layer, feats in enumerate(self.normalize(batch.activations)):
            append_rows(self._state, f"features{layer}", feats, self.bank_dtype)
        self._state.append("labels", labels.to(batch.out.device))
        self._n_classes = n_classes

    def _calib_end(self) -> None:
        state = self._state
        n_layers = 0
        while has_rows(state, f"features{n_layers}"):
            n_layers += 1
        features = tuple(take_rows(state, f"features{layer}") for layer in range(n_layers))
        labels = state.cat("labels")
        rows = bank_rows(len(labels), self.bank_fraction, self.bank_seed, labels.device)
        if rows is not None:
            features = tuple(feats[rows.to(feats.device)] for feats in features)
            labels = labels[rows]
        self.n_classes: int = self.__dict__.pop("_n_classes")
        self.labels: Tensor = labels
        self.indexes: tuple[Index, ...] = make_indexes(
            features, metric=self.index_metric, backend=self.index_backend
        )
        self.calib_sorted: Tensor | None = None
        self.class_counts: Tensor | None = None
        if not self._uses_p_values:
            return
        n_calib = len(labels)
        k_calib = min(self.k, n_calib - 1)
        agreements = []
        for index, feats in zip(self.indexes, features, strict=True):
            if k_calib == 0:
                agreements.append(torch.zeros_like(labels))
                continue
            counts = knn_label_count(
                index, labels, self.n_classes, k_calib, as_dense(feats), self_query=True
            )
            agreements.append(counts.gather(1, labels.to(counts.device)[:, None]).squeeze(1))
        rows = torch.stack(agreements)  # (L, n_calib)
        if not self.per_layer:
            rows = rows.sum(dim=0, keepdim=True)
        if self.per_class:
            # Sort by (label, agreement) at once: keys label·base + agreement.
            labels = labels.to(rows.device)
            rows = labels * self._key_base(n_layers) + rows
            self.class_counts = torch.bincount(labels, minlength=self.n_classes)
        self.calib_sorted = rows.sort(dim=1).values

    def _key_base(self, n_layers: int) -> int:
        """An integer larger than any vote count of a row."""
        return self.k * (1 if self.per_layer else n_layers) + 1

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        features = self.activations()
        votes = torch.stack(
            [
                knn_label_count(index, self.labels, self.n_classes, self.k, feats)
                for index, feats in zip(self.indexes, features, strict=True)
            ]
        )  # (L, n, C)
        if not self.per_layer:
            votes = votes.sum(dim=0, keepdim=True)
        if not self._uses_p_values:
            return out, votes[0].to(out.dtype)
        assert self.calib_sorted is not None
        cdtype = torch.float64 if out.dtype == torch.float64 else torch.float32
        sorted_rows = self.calib_sorted.to(votes.device)
        n_layers = len(self.indexes)
        if self.per_class:
            assert self.class_counts is not None
            class_counts = self.class_counts.to(votes.device)
            offsets = torch.arange(self.n_classes, device=votes.device) * self._key_base(n_layers)
            starts = torch.cumsum(class_counts, 0) - class_counts
            below = [
                torch.searchsorted(row, offsets + row_votes) - starts
                for row, row_votes in zip(sorted_rows, votes, strict=True)
            ]
            denominator = class_counts.to(cdtype)
        else:
            below = [
                torch.searchsorted(row, row_votes)
                for row, row_votes in zip(sorted_rows, votes, strict=True)
            ]
            denominator = torch.tensor(float(len(self.labels)), dtype=cdtype, device=votes.device)
        p_values = torch.stack(below).to(cdtype) / denominator
        p_values = p_values.nan_to_num(nan=0.0)  # classes absent from calibration
        conformity = get_aggregator(self.aggregation)(p_values, dim=0)
        return out, conformity.to(out.dtype)
