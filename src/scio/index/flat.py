"""The torch backend of :class:`~scio.index.index.Index`: an exact ("flat") index.

The population is a tensor on the device of the first added samples; a search is a loop of
tiled matrix products (or exact differences for small problems) followed by ``topk``, with
bounded memory (:data:`_DEFAULT_BLOCK_BYTES` per block of the distance matrix). The
semantics (squared L2 or inner product, fillers, tie order) are those documented in
:mod:`scio.index.index`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from scio.index.bank import ResidualBank, encode
from scio.utils.enums import IndexMetric

__all__ = ["FLT_MAX", "TorchIndexFlat", "TorchIndexFlatIP", "TorchIndexFlatL2"]

FLT_MAX = float(np.finfo(np.float32).max)
"""faiss' filler value ``3.4028235e38`` (largest finite float32)."""

_DEFAULT_BLOCK_BYTES = 256 * 2**20
_DIRECT_L2_MAX_ELEMENTS = 2**20  # below this (nq·N·d), L2 is computed with exact differences


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchIndexFlat:
    """Exact flat index stored as a torch tensor (torch backend of :class:`Index`).

    The population keeps the device and (floating) dtype of the first added samples; float16 /
    bfloat16 populations are searched in float32, float64 ones in float64. Non-floating samples
    are stored as float32. A :class:`~scio.index.bank.ResidualBank` population stays
    coded (half-precision residuals to a codebook) and is decoded block by block.
    """

    metric: ClassVar[IndexMetric]

    def __init__(self, d: int, *, max_block_bytes: int = _DEFAULT_BLOCK_BYTES) -> None:
        self.d = d
        self.max_block_bytes = max_block_bytes
        self._data: Tensor | None = None
        self._sqnorms: Tensor | None = None  # squared norms in compute dtype (l2 only)
        self._codes: Tensor | None = None  # coded population: ``_data`` holds the residuals
        self._codebook: Tensor | None = None

    @property
    def ntotal(self) -> int:
        """Number of samples in the index."""
        return 0 if self._data is None else self._data.shape[0]

    @property
    def data(self) -> Tensor | None:
        """The stored population ``(ntotal, d)`` (``None`` before the first ``add``; decoded
        in the compute dtype if coded)."""
        if self._data is not None and self._codes is not None:
            return self._rows(0, len(self._data), _compute_dtype(self._data.dtype))
        return self._data

    @property
    def stored(self) -> Tensor | ResidualBank | None:
        """The population as stored: a tensor, or the coded bank."""
        if self._data is not None and self._codes is not None:
            assert self._codebook is not None
            return ResidualBank(self._codebook, self._codes, self._data)
        return self._data

    def _rows(self, start: int, stop: int, cdtype: torch.dtype) -> Tensor:
        """Population rows ``start:stop`` in ``cdtype`` (decoded if coded)."""
        assert self._data is not None
        rows = self._data[start:stop].to(cdtype)
        if self._codes is not None:
            assert self._codebook is not None
            rows = rows + self._codebook[self._codes[start:stop].long()].to(cdtype)
        return rows

    def add(self, x: Tensor | ResidualBank) -> None:
        """Append ``x`` of shape ``(n, d)`` (copied) to the population.

        A :class:`~scio.index.bank.ResidualBank` is kept coded, without a copy of its
        tensors; rows added later to a coded population are coded against its codebook.
        """
        first = self._data is None
        if isinstance(x, ResidualBank):
            if not first and self._codes is None:  # plain population: store decoded
                x = x.decode()
            else:
                self._add_coded(x)
                return
        x = x.detach()
        if self._codes is not None and self._codebook is not None and self._data is not None:
            self._add_coded(encode(x.to(self._codebook.device), self._codebook, self._data.dtype))
            return
        if self._data is None:
            dtype = x.dtype if x.is_floating_point() else torch.float32
            new = x.to(dtype=dtype, copy=True).contiguous()
        else:
            new = x.to(device=self._data.device, dtype=self._data.dtype)
        self._append(new, None)

    def _add_coded(self, bank: ResidualBank) -> None:
        if self._data is None or self._codebook is None or self._codes is None:
            # stored without a copy (a bank is built for its index; the index never writes
            # in place): a 1M-row bank is not held twice, and the per-class indexes of one
            # bank share its codebook
            self._codebook = bank.codebook.detach()
            self._append(bank.residuals.detach().contiguous(), bank.codes.detach())
            return
        device = self._data.device
        if not _same_tensor(bank.codebook, self._codebook):  # another one: keep both, shift
            offset = len(self._codebook)
            self._codebook = torch.cat([self._codebook, bank.codebook.to(device)])
            codes = bank.codes.to(device) + offset
        else:
            codes = bank.codes.to(device)
        self._append(bank.residuals.to(device=device, dtype=self._data.dtype), codes)

    def _append(self, new: Tensor, codes: Tensor | None) -> None:
        """Append stored rows (and their codes for a coded population)."""
        start = 0 if self._data is None else len(self._data)
        self._data = new if self._data is None else torch.cat([self._data, new])
        if codes is not None:
            self._codes = codes if self._codes is None else torch.cat([self._codes, codes])
        if self.metric != IndexMetric.L2:
            return
        cdtype, step = _compute_dtype(new.dtype), max(1, 2**22 // max(self.d, 1))
        stop = len(self._data)
        chunks = [  # by row chunks: no full-size temporary
            self._rows(i, min(i + step, stop), cdtype).square().sum(dim=1)
            for i in range(start, stop, step)
        ]
        sq = torch.cat(chunks) if chunks else new.new_zeros(0, dtype=cdtype)
        self._sqnorms = sq if self._sqnorms is None else torch.cat([self._sqnorms, sq])

    def remove_ids(self, ids: Tensor) -> int:
        """Remove the samples at positions ``ids`` (others keep their order); count removed."""
        if self._data is None:
            return 0
        n = self._data.shape[0]
        ids = ids.to(device=self._data.device, dtype=torch.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < n)]
        keep = torch.ones(n, dtype=torch.bool, device=self._data.device)
        keep[ids] = False
        n_kept = int(keep.sum())
        if n_kept < n:
            self._data = self._data[keep]
            if self._codes is not None:
                self._codes = self._codes[keep]
            if self._sqnorms is not None:
                self._sqnorms = self._sqnorms[keep]
        return n - n_kept

    def search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact k-NN of ``q`` ``(nq, d)``: ``(D, I)`` on the population's device.

        ``D`` is in the compute dtype, fillers included (see module docstring).
        """
        ip = self.metric == IndexMetric.IP
        filler = -FLT_MAX if ip else FLT_MAX
        nq = q.shape[0]
        if self._data is None:
            D = torch.full((nq, k), filler, dtype=torch.float32, device=q.device)
            return D, torch.full((nq, k), -1, dtype=torch.int64, device=q.device)
        data = self._data
        device, cdtype = data.device, _compute_dtype(data.dtype)
        q = q.to(device=device, dtype=cdtype)
        n = data.shape[0]
        kk = min(k, n)
        costs = torch.empty((nq, kk), dtype=cdtype, device=device)
        ids = torch.empty((nq, kk), dtype=torch.int64, device=device)
        if kk > 0 and nq > 0:
            self._search_into(q, kk, costs, ids, ip=ip)
        # ``costs`` are minimised: squared distance (l2) or minus the inner product (ip).
        invalid = ~(costs < FLT_MAX)  # NaN, or not better than faiss' filler
        D = costs.neg().add_(0.0) if ip else costs  # ``+ 0.0`` turns -0.0 into +0.0
        D = D.masked_fill(invalid, filler)
        ids = ids.masked_fill(invalid, -1)
        if kk < k:
            D = torch.cat([D, D.new_full((nq, k - kk), filler)], dim=1)
            ids = torch.cat([ids, ids.new_full((nq, k - kk), -1)], dim=1)
        return D, ids

    def _search_into(self, q: Tensor, k: int, costs: Tensor, ids: Tensor, *, ip: bool) -> None:
        assert self._data is not None
        data = self._data
        cdtype = q.dtype
        nq, n, d = q.shape[0], data.shape[0], data.shape[1]
        direct = not ip and nq * n * d <= _DIRECT_L2_MAX_ELEMENTS
        budget = max(1, self.max_block_bytes // q.element_size())
        if direct or nq * n <= budget:
            q_tile, p_tile = nq, n
        else:
            p_tile = min(n, max(1, budget // min(nq, 256)))
            q_tile = max(1, min(nq, budget // p_tile))
        for q0 in range(0, nq, q_tile):
            qb = q[q0 : q0 + q_tile]
            qsq = None if ip else qb.square().sum(dim=1, keepdim=True)
            best: tuple[Tensor, Tensor] | None = None
            for p0 in range(0, n, p_tile):
                xb = self._rows(p0, p0 + p_tile, cdtype)
                offset = None
                if ip:
                    block = torch.mm(qb.neg(), xb.T)
                elif direct:
                    block = (qb[:, None, :] - xb[None, :, :]).square().sum(dim=2)
                else:
                    assert self._sqnorms is not None
                    # ||q||² is added (and the result clamped at 0) after the selection
                    block = torch.addmm(self._sqnorms[p0 : p0 + p_tile], qb, xb.T, alpha=-2)
                    offset = qsq
                v, i = _smallest_k(block, min(k, block.shape[1]), offset, self.max_block_bytes)
                i += p0
                best = (v, i) if best is None else _merge(best, (v, i), k)
            assert best is not None
            costs[q0 : q0 + q_tile], ids[q0 : q0 + q_tile] = best


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory with the same layout."""
    return (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


class TorchIndexFlatL2(TorchIndexFlat):
    """Torch flat index, squared L2 distance."""

    metric = IndexMetric.L2


class TorchIndexFlatIP(TorchIndexFlat):
    """Torch flat index, inner product."""

    metric = IndexMetric.IP


def _merge(
    first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor], k: int
) -> tuple[Tensor, Tensor]:
    """Merge two partial results, each ordered by (value, id), all ids of ``first`` being lower
    than those of ``second``: a stable sort of the concatenation orders by (value, id)."""
    values = torch.cat([first[0], second[0]], dim=1)
    ids = torch.cat([first[1], second[1]], dim=1)
    values, order = values.sort(dim=1, stable=True)
    return values[:, :k], ids.gather(1, order[:, :k])


def _smallest_k(
    cost: Tensor,
    k: int,
    offset: Tensor | None = None,
    max_block_bytes: int = _DEFAULT_BLOCK_BYTES,
) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest entries of each row, ordered by (value, column), NaN last.

    Exactly tied values are resolved towards the lowest column, including at the boundary
    (which of several tied candidates is kept). With ``offset`` ``(rows, 1)``, the values are
    ``f(cost) = max(cost + offset, 0)``; as ``f`` is non-decreasing (also in floating point),
    it is only applied to the selected candidates, which gives exactly the same result as
    selecting on ``f(cost)``.
    """

    def final(values: Tensor, rows: Tensor | slice) -> Tensor:
        return values if offset is None else (values + offset[rows]).clamp_(min=0)

    all_rows = slice(None)
    if k >= cost.shape[1]:
        return final(cost, all_rows).sort(dim=1, stable=True)
    # One extra candidate tells whether ties cross the boundary (k-th == (k+1)-th value).
    _, idx = cost.topk(k + 1, dim=1, largest=False, sorted=False)
    idx = idx.sort(dim=1).values
    vals = final(cost.gather(1, idx), all_rows)
    vals, order = vals.sort(dim=1, stable=True)
    idx = idx.gather(1, order)
    tied = (vals[:, k] == vals[:, k - 1]) & (vals[:, k - 1] < FLT_MAX)
    vals, idx = vals[:, :k], idx[:, :k]
    if bool(tied.any()):
        # Rows where ties cross the boundary: keep every candidate strictly below the k-th
        # value, then the lowest columns among those equal to it (a top-k on integer keys).
        # Processed by chunks of rows to bound memory.
        tied_rows = tied.nonzero().squeeze(1)
        n_cols = cost.shape[1]
        columns = torch.arange(n_cols, device=cost.device, dtype=torch.int32).unsqueeze(0)
        chunk = max(1, max_block_bytes // (16 * n_cols))
        for start in range(0, len(tied_rows), chunk):
            rows = tied_rows[start : start + chunk]
            sub = final(cost[rows], rows)
            kth = vals[rows, k - 1 :]
            keys = torch.where(sub < kth, -1, torch.where(sub == kth, columns, n_cols))
            sel = keys.topk(k, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
            sel_vals, order = sub.gather(1, sel).sort(dim=1, stable=True)
            vals[rows] = sel_vals
            idx[rows] = sel.gather(1, order)
    return vals, idx
