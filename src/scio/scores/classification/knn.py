"""KNN: distance to the k-th nearest calibration feature."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from scio.index.bank import append_rows, bank_rows, bank_size, check_bank_params, take_rows
from scio.index.index import IndexBackend
from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch
from scio.scores.utils import Index, make_indexes
from scio.utils.enums import IndexMetric, IndexMetricLike

__all__ = ["KNN", "check_bank"]


def check_bank(score: Any, n_calib: int) -> None:
    """Validate a kNN-type score's bank parameters and that ``k`` fits in the kept bank."""
    check_bank_params(score.bank_fraction, score.bank_dtype, score.index_backend)
    kept = bank_size(n_calib, score.bank_fraction)
    if score.k > kept:
        msg = (
            f"`k` must not exceed the {kept} samples kept in the bank "
            f"(⌈bank_fraction · n_calib⌉ = ⌈{score.bank_fraction} · {n_calib}⌉; got k={score.k})"
        )
        raise ParamError(msg)


class KNN(StreamingCalibration, BaseScoreClassif):
    """Deep nearest neighbours (Sun et al., "Out-of-Distribution Detection with Deep
    Nearest Neighbors", ICML 2022).

    Idea: in-distribution inputs have close neighbours among (normalised) calibration
    features, OoD inputs do not. Features of the recorded layers are flattened,
    concatenated and ``act_norm``-normalised (L2 by default, as in the paper).

    Formula: with ``z`` the normalised feature and ``z_(k)`` its k-th nearest calibration
    feature, conformity = ``-||z - z_(k)||²`` (``l2``) or ``<z, z_(k)>`` (``ip``), identical
    for every class.

    Args:
        k: rank of the neighbour (``0 < k <= n_calib``; the paper uses ``n_calib ** 0.4``
            as a rule of thumb and the penultimate layer).
        act_norm: feature normalisation order (default 2.0).
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

    Cost: no extra forward pass; calibration keeps the ``(n_calib, d)`` features; inference
    is one exact tiled ``(n, d) x (d, n_calib)`` search on the data's device.
    """

    k: int
    act_norm: float | None = 2.0
    index_metric: IndexMetricLike = "l2"
    bank_fraction: float = 1.0
    bank_seed: int = 0
    bank_dtype: str | None = None
    index_backend: IndexBackend = "torch"

    _extension_params = frozenset({"bank_fraction", "bank_seed", "bank_dtype", "index_backend"})

    _fitted_attrs = ("index",)

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
        self.index: Index = make_indexes(bank, metric=self.index_metric, backend=self.index_backend)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        (features,) = self.activations(concatenate=True)
        distances = self.index.search(features, self.k)[0][:, -1]
        if IndexMetric(self.index_metric) == IndexMetric.IP:
            return out, distances
        return out, -distances
