"""Feature banks of the nearest-neighbour scores: half-precision storage (float16/bfloat16
residuals to a small k-means codebook) and the bank parameters (subsampling, dtype, backend).

Why. Rounding a bank row ``x`` to float16 moves each value by up to ``2**-11`` of itself, so
the distance to a query moves by ~1e-4 relatively and near-tied neighbours swap: plain
float16 storage changes the k = 5 neighbour set of 0.5 % of the queries on the benchmark
features (L2-normalised penultimate features of the fmnist model), where 1 % of the queries
have their k-th and (k+1)-th distances within 1e-4 of each other. Stored instead as
``x = c[code] + r``, with ``c`` a float32 codebook of at most :data:`CODEBOOK_SIZE`
centroids and only the residual ``r`` in half precision, the rounding error scales with
``||x - c||`` (≈ 0.21 ``||x||`` there) and the k = 5 neighbour sets agree with float32 on
99.93 % of 10,000 queries (plain float16: 99.67 %; ``docs/performance.md`` has k = 1 to 50
and ``tests/scores/test_banks.py`` checks it). This is the residual coding of IVF
indexes (Jégou et al., "Product quantization for nearest neighbor search", TPAMI 2011;
faiss' ``by_residual`` scalar quantisers) with a half-precision scalar code. Cost: one
int32 code per row (1.6 % of a d = 128 float16 row) and ``m × d`` float32 centroids
(``m ≤ 256``: 1 KiB per feature dimension), a k-means on the first rows (0.6 s for
4096 × 2048 on 2 CPU cores), one gather-add per row block when searching.

Streaming, batch-invariant. The first :data:`TRAIN_ROWS` rows of a calibration stream are
kept in full precision; once they are all there, a seeded Lloyd k-means
(:data:`KMEANS_ITERATIONS` iterations, deterministic: one-hot matrix products, no atomics)
trains the codebook on them and every row from then on is stored coded. A stream shorter
than that is coded at the end. The codebook therefore depends on the first rows of the
stream only, not on how it is batched.

Across processes (:mod:`scio.scores.core.distributed`): every rank codes its own rows; the
merged bank concatenates the ranks' codebooks (codes shifted) in rank order, and the rows
of ranks that never reached :data:`TRAIN_ROWS` are coded together at the end against a
codebook trained on their first :data:`TRAIN_ROWS`, which is exactly the single-process
bank when no rank reached it. Otherwise it equals the single-process bank up to the
half-precision rounding of the residuals (different codebooks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from scio.utils.state import CalibState

__all__ = [
    "BANK_DTYPES",
    "CODEBOOK_SIZE",
    "KMEANS_ITERATIONS",
    "TRAIN_ROWS",
    "ResidualBank",
    "append_rows",
    "as_dense",
    "assign",
    "bank_rows",
    "bank_size",
    "check_bank_params",
    "encode",
    "has_rows",
    "kmeans",
    "take_rows",
]

#: Storage dtypes accepted as ``bank_dtype`` by the kNN-type scores.
BANK_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_HALF = (torch.float16, torch.bfloat16)
#: Rows of a stream kept in full precision to train its codebook.
TRAIN_ROWS = 4096
#: Most centroids of a codebook.
CODEBOOK_SIZE = 256
#: Lloyd iterations of the codebook's k-means.
KMEANS_ITERATIONS = 10
_CHUNK_ELEMENTS = 2**22  # bound of one block of the assignment's distance matrix


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class ResidualBank:
    """Rows stored as ``codebook[codes] + residuals`` (see the module docstring).

    ``codebook`` ``(m, d)`` in the compute dtype (float32, or float64), ``codes`` ``(n,)``
    int32, ``residuals`` ``(n, d)`` in the half-precision storage dtype.
    """

    codebook: Tensor
    codes: Tensor
    residuals: Tensor

    def __len__(self) -> int:
        return int(self.residuals.shape[0])

    @property
    def shape(self) -> torch.Size:
        """``(n, d)``."""
        return self.residuals.shape

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the residuals."""
        return self.residuals.dtype

    @property
    def device(self) -> torch.device:
        return self.residuals.device

    def __getitem__(self, rows: Tensor | slice) -> ResidualBank:
        """The bank of the selected rows (same codebook)."""
        return ResidualBank(self.codebook, self.codes[rows], self.residuals[rows])

    def decode(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` in the compute dtype."""
        codes = self.codes[start:stop].long()
        return self.residuals[start:stop].to(self.codebook.dtype) + self.codebook[codes]

    def to(self, device: torch.device | str) -> ResidualBank:
        return ResidualBank(
            self.codebook.to(device), self.codes.to(device), self.residuals.to(device)
        )


def as_dense(rows: Tensor | ResidualBank) -> Tensor:
    """``rows`` as a plain tensor (decoded in the compute dtype if coded)."""
    return rows.decode() if isinstance(rows, ResidualBank) else rows


def concat(banks: Sequence[ResidualBank]) -> ResidualBank:
    """One bank holding the rows of ``banks`` in order (codebooks concatenated)."""
    offsets, total = [], 0
    for bank in banks:
        offsets.append(total)
        total += len(bank.codebook)
    return ResidualBank(
        torch.cat([bank.codebook for bank in banks]),
        torch.cat([bank.codes + offset for bank, offset in zip(banks, offsets, strict=True)]),
        torch.cat([bank.residuals for bank in banks]),
    )


def assign(rows: Tensor, codebook: Tensor) -> Tensor:
    """Index ``(n,)`` int32 of the nearest centroid of each row (first one on ties)."""
    if len(codebook) == 0 or len(rows) == 0:
        return torch.zeros(len(rows), dtype=torch.int32, device=rows.device)
    c_sq = codebook.square().sum(dim=1)
    step = max(1, _CHUNK_ELEMENTS // max(len(codebook), 1))
    codes = [
        torch.addmm(c_sq, rows[i : i + step], codebook.T, alpha=-2).argmin(dim=1)
        for i in range(0, len(rows), step)
    ]
    return torch.cat(codes).to(torch.int32)


def kmeans(
    rows: Tensor, m: int | None = None, *, iterations: int | None = None, seed: int = 0
) -> Tensor:
    """Lloyd k-means centroids ``(min(m, n), d)`` of ``rows`` (compute dtype), deterministic:
    seeded initial rows, sums as one-hot matrix products, empty clusters keep their centre.
    ``None``: :data:`CODEBOOK_SIZE` centroids, :data:`KMEANS_ITERATIONS` iterations."""
    x = rows.to(_compute_dtype(rows.dtype))
    m = min(CODEBOOK_SIZE if m is None else m, len(x))
    iterations = KMEANS_ITERATIONS if iterations is None else iterations
    if m == 0:
        return x.new_zeros((0, x.shape[1]))
    generator = torch.Generator().manual_seed(seed)
    start = torch.randperm(len(x), generator=generator)[:m].sort().values
    centres = x[start.to(x.device)].clone()
    classes = torch.arange(m, device=x.device)
    for _ in range(iterations):
        onehot = (assign(x, centres)[None, :] == classes[:, None]).to(x.dtype)  # (m, n)
        counts = onehot.sum(dim=1, keepdim=True)
        means = (onehot @ x) / counts.clamp(min=1)
        centres = torch.where(counts > 0, means, centres)
    return centres


def encode(rows: Tensor, codebook: Tensor, dtype: torch.dtype) -> ResidualBank:
    """``rows`` coded against ``codebook`` with residuals stored as ``dtype``."""
    x = rows.to(codebook.dtype)
    codes = assign(x, codebook)
    residuals = (x - codebook[codes.long()]).to(dtype)
    return ResidualBank(codebook, codes, residuals)


# -- streaming in a CalibState (mergeable: see the module docstring) ------------------------------
_FIELDS = ("pending", "codebook", "codes", "residuals", "layout")


def _pop(state: CalibState, name: str) -> Tensor:
    parts = state.pop(name)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def append_rows(state: CalibState, name: str, features: Tensor, dtype: str | None) -> None:
    """Store a batch of bank rows under ``name`` in the storage ``dtype`` (``None``: as is).

    Half-precision dtypes are coded as residuals (see the module docstring); the others are
    converted and appended as plain tensors.
    """
    rows = features.detach().flatten(1) if features.ndim > 1 else features.detach()[:, None]
    storage = None if dtype is None else BANK_DTYPES[dtype]
    if storage not in _HALF:
        state.append(name, rows if storage is None else rows.to(storage))
        return
    assert storage is not None
    x = rows.to(_compute_dtype(rows.dtype))
    key = {field: f"{name}.{field}" for field in _FIELDS}
    if key["layout"] not in state:  # every field exists from the first batch on (same names
        for field in ("pending", "codebook"):  # on every rank for the distributed merge)
            state.append(key[field], x[:0])
        state.append(key["codes"], torch.zeros(0, dtype=torch.int32, device=x.device))
        state.append(key["residuals"], x[:0].to(storage))
        state.append(key["layout"], torch.zeros((1, 3), dtype=torch.int64))
    if state.n_rows(key["codebook"]) == 0:
        take = min(len(x), TRAIN_ROWS - state.n_rows(key["pending"]))
        state.append(key["pending"], x[:take])
        x = x[take:]
        if state.n_rows(key["pending"]) >= TRAIN_ROWS:
            pending = _pop(state, key["pending"])
            state.append(key["pending"], pending[:0])
            _pop(state, key["codebook"])
            state.append(key["codebook"], kmeans(pending))
            _append_coded(state, key, encode(pending, state.cat(key["codebook"]), storage))
    if len(x):
        _append_coded(state, key, encode(x, state.cat(key["codebook"]), storage))
    _pop(state, key["layout"])
    counts = [state.n_rows(key[field]) for field in ("pending", "codes", "codebook")]
    state.append(key["layout"], torch.tensor([counts], dtype=torch.int64))


def _append_coded(state: CalibState, key: dict[str, str], bank: ResidualBank) -> None:
    state.append(key["codes"], bank.codes)
    state.append(key["residuals"], bank.residuals)


def has_rows(state: CalibState, name: str) -> bool:
    """Whether rows were appended under ``name`` by :func:`append_rows`."""
    return name in state or f"{name}.layout" in state


def take_rows(state: CalibState, name: str) -> Tensor | ResidualBank:
    """Remove the rows stored under ``name`` by :func:`append_rows` and return them in
    stream (rank) order.

    Half-precision dtypes give a :class:`ResidualBank`; the rows of a stream (or of the
    ranks) that never reached :data:`TRAIN_ROWS` are coded here.
    """
    if f"{name}.layout" not in state:
        return _pop(state, name)
    key = {field: f"{name}.{field}" for field in _FIELDS}
    layout = _pop(state, key["layout"]).tolist()
    pending, codebooks = _pop(state, key["pending"]), _pop(state, key["codebook"])
    codes, residuals = _pop(state, key["codes"]), _pop(state, key["residuals"])
    storage = residuals.dtype  # the storage dtype (an empty part exists from the first batch)
    late = encode(pending, kmeans(pending[:TRAIN_ROWS]), storage) if len(pending) else None
    segments: list[ResidualBank] = []
    at = {"pending": 0, "codes": 0, "codebook": 0}
    for n_pending, n_coded, n_book in layout:  # one row per rank, each pending or coded
        if n_pending:
            assert late is not None
            p = at["pending"]
            segments.append(late[p : p + n_pending])
            at["pending"] += n_pending
        if n_coded:
            c, b = at["codes"], at["codebook"]
            book = codebooks[b : b + n_book]
            segments.append(ResidualBank(book, codes[c : c + n_coded], residuals[c : c + n_coded]))
        at["codes"] += n_coded
        at["codebook"] += n_book
    if not segments:
        return ResidualBank(codebooks[:0], codes[:0], residuals[:0])
    return _concat_shared(segments)


def _concat_shared(segments: list[ResidualBank]) -> ResidualBank:
    """Concatenate segments, storing a codebook shared by consecutive segments once."""
    banks: list[ResidualBank] = []
    for segment in segments:
        if banks and banks[-1].codebook is segment.codebook:
            last = banks[-1]
            banks[-1] = ResidualBank(
                last.codebook,
                torch.cat([last.codes, segment.codes]),
                torch.cat([last.residuals, segment.residuals]),
            )
        else:
            banks.append(segment)
    return banks[0] if len(banks) == 1 else concat(banks)


# -- bank parameters of the nearest-neighbour scores (subsampling, storage dtype, backend) ------
#: The values of :data:`scio.index.index.IndexBackend` (tested to stay equal).
_BACKENDS = ("torch", "faiss", "faiss-ivf", "faiss-hnsw")


def bank_size(n: int, fraction: float) -> int:
    """Number of calibration samples kept by a bank subsampled at ``fraction``: ``⌈α·n⌉``."""
    return max(1, math.ceil(fraction * n)) if n else 0


def check_bank_params(fraction: float, dtype: str | None, backend: str) -> None:
    """Validate a bank's subsampling fraction ``α ∈ (0, 1]``, storage dtype and backend.

    Raises:
        ValueError: naming the argument, the expected and the actual value.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        msg = f"`bank_fraction` must lie in (0, 1] (got {fraction!r})"
        raise ValueError(msg)
    if dtype is not None and dtype not in BANK_DTYPES:
        msg = f"`bank_dtype` must be None or one of {sorted(BANK_DTYPES)} (got {dtype!r})"
        raise ValueError(msg)
    if backend not in _BACKENDS:
        msg = f"`index_backend` must be one of {list(_BACKENDS)} (got {backend!r})"
        raise ValueError(msg)


def bank_rows(n: int, fraction: float, seed: int, device: torch.device) -> Tensor | None:
    """Sorted positions of the ``⌈α·n⌉`` calibration samples kept in the bank (``None``: all).

    A uniform subsample without replacement, drawn from a CPU generator seeded with ``seed``
    (the same on every machine and for any batching or sharding of the calibration set), as
    in the KNN paper's random fraction α of the training set (Sun et al., ICML 2022).
    """
    if fraction >= 1:
        return None
    generator = torch.Generator().manual_seed(int(seed))
    rows = torch.randperm(n, generator=generator)[: bank_size(n, fraction)]
    return rows.sort().values.to(device)
