"""LID: local intrinsic dimensionality of the features among calibration neighbours."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from scio.index.bank import append_rows, bank_rows, take_rows
from scio.index.index import IndexBackend
from scio.scores.classification.base import BaseScoreClassif
from scio.scores.classification.knn import check_bank
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.utils import Index, make_indexes

__all__ = ["LID"]


class LID(StreamingCalibration, BaseScoreClassif):
    """Local Intrinsic Dimensionality (Ma et al., "Characterizing Adversarial Subspaces
    Using Local Intrinsic Dimensionality", ICLR 2018).

    Idea: around in-distribution features, calibration features fill a low-dimensional
    neighbourhood; adversarial or OoD inputs fall in regions whose neighbourhood looks
    higher-dimensional. The local dimension is estimated with the maximum-likelihood
    estimator of Levina & Bickel from the distances to the ``k`` nearest calibration
    features (recorded layers flattened, concatenated, ``act_norm``-normalised).

    Formula: with ``D2_1 <= ... <= D2_k`` the squared L2 distances to the ``k`` nearest
    calibration features, ``lid = k / Σ_i log(D2_k / D2_i)`` (``0`` when ``D2_1 = 0``, i.e.
    the query is a calibration point; ``+inf`` when undefined, e.g. ``k = 1`` or ``k`` equal
    distances) and ``conformity = -2 · lid`` (the factor 2 turns the squared-distance
    estimate into the usual distance-based MLE), identical for every class.

    Args:
        k: number of neighbours (``0 < k <= n_calib``).
        bank_fraction: extension: fraction ``α ∈ (0, 1]`` of the calibration samples kept in
            the bank (a seeded uniform subsample, the KNN paper's α; ``1``: all).
        bank_seed: extension: seed of the bank subsample.
        bank_dtype: extension: bank storage dtype (``"float16"``, ``"bfloat16"``, ...; ``None``:
            the features' dtype); half-precision banks store float16 residuals to a small
            float32 codebook and are searched with float32 accumulation
            (:mod:`scio.index.bank`).
        index_backend: extension: ``"torch"`` (exact, default), ``"faiss"`` (exact) or the
            approximate ``"faiss-ivf"`` / ``"faiss-hnsw"`` (see :mod:`scio.index.index`).

    Cost: no extra forward pass; calibration keeps the ``(n_calib, d)`` features in an exact
    index on the data's device; inference is one ``(n, d) x (d, n_calib)`` search.
    """

    k: int
    bank_fraction: float = 1.0
    bank_seed: int = 0
    bank_dtype: str | None = None
    index_backend: IndexBackend = "torch"

    _extension_params = frozenset({"bank_fraction", "bank_seed", "bank_dtype", "index_backend"})

    _fitted_attrs: ClassVar[tuple[str, ...]] = ("index",)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        check_bank(self, n_calib)

    def _calib_update(self, batch: CalibBatch) -> None:
        (features,) = self.normalize(batch.activations, concatenate=True)
        append_rows(self._state, "features", features, self.bank_dtype)

    def _calib_end(self) -> None:
        features = take_rows(self._state, "features")  # parts freed once joined
        rows = bank_rows(len(features), self.bank_fraction, self.bank_seed, features.device)
        bank = features if rows is None else features[rows]
        self.index: Index = make_indexes(bank, metric="l2", backend=self.index_backend)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        (features,) = self.activations(concatenate=True)
        cdtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        d2 = self.index.search(features.to(cdtype), self.k)[0]  # (n, k), ascending
        log_ratios = (d2[:, -1:] / d2).log()
        lid = self.k / log_ratios.sum(dim=1)
        lid = lid.masked_fill(d2[:, 0] == 0, 0.0).nan_to_num(nan=math.inf)
        return out, (-2 * lid).to(out.dtype)
