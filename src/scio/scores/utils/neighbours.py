"""Statistics of the labels of nearest neighbours (DkNN's votes, JTLA's local densities)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from scio.scores.utils.utils import _upcast

if TYPE_CHECKING:
    from scio.index.index import Index

__all__ = ["ak_lpe", "knn_label_count"]


def knn_label_count(
    index: Index,
    labels: Tensor,
    n_classes: int,
    k: int,
    query: Tensor,
    *,
    self_query: bool = False,
) -> Tensor:
    """Per query, the number of each label among its ``k`` nearest neighbours in ``index``.

    Args:
        index: Index of the labelled population.
        labels: Labels of the indexed samples, shape ``(index.ntotal,)``, values in
            ``[0, n_classes)``.
        n_classes: Number of classes.
        k: Number of neighbours.
        query: Queries (first dimension = samples).
        self_query: See :meth:`Index.search`.

    Returns:
        ``(n_query, n_classes)`` int64 counts on the query's device, or, as in the reference,
        a NaN-filled tensor of the default float dtype (float32) if
        ``k + self_query > index.ntotal``. Exactly tied neighbours are chosen as the reference's
        faiss index chooses them, whatever the backend (``l2``: lowest ids; ``ip``: see
        ``_faiss_order_ip_neighbours``).

    Raises:
        ValueError: Wrong ``labels`` shape or a label ``>= n_classes``.

    """
    ntotal = index.ntotal
    if labels.shape != (ntotal,):
        msg = f"`labels` must have shape (index.ntotal,)={(ntotal,)} (got {labels.shape})"
        raise ValueError(msg)
    out_of_range = labels >= n_classes
    if not torch.compiler.is_exporting() and bool(out_of_range.any()):  # checked at fit
        msg = f"`labels` value out of range at: {out_of_range.nonzero()}"
        raise ValueError(msg)
    n_query = query.shape[0] if query.ndim else 1
    if k + self_query > ntotal:
        dtype = torch.get_default_dtype()
        return torch.full((n_query, n_classes), math.nan, dtype=dtype, device=query.device)
    exporting = torch.compiler.is_exporting()  # then ties are in `topk` order (no loop)
    if index.backend == "torch" and index.D_is_similarity and k > 0 and not exporting:
        I = _faiss_order_ip_neighbours(index, query, k, self_query=self_query)
    else:
        _, I = index.search(query, k, self_query=self_query)
    found = I >= 0  # fillers (NaN queries) are not counted
    neighbour_labels = labels.to(device=I.device, dtype=torch.int64)[I.clamp(min=0)]
    counts = torch.zeros((I.shape[0], n_classes), dtype=torch.int64, device=I.device)
    return counts.scatter_add_(1, neighbour_labels, found.to(torch.int64))


def _faiss_order_ip_neighbours(index: Index, query: Tensor, k: int, *, self_query: bool) -> Tensor:
    """Neighbour ids ``(n, k)`` (as a set per row) chosen among exactly tied inner products
    as the reference's faiss ``IndexFlatIP`` chooses them.

    faiss scans the population in id order with a min-heap of size ``kk``: a candidate enters
    only if strictly better than the current worst, and ties among the worst are evicted lowest
    id first. So, with ``v`` the ``kk``-th best value, every value ``> v`` is kept, and of the
    ids tied at ``v``, among those met while fewer than ``kk`` values ``>= v`` had been seen,
    the highest ones fill the remaining places. ``self_query`` then drops the query itself, or
    else the worst kept value (lowest id among tied worst ones, faiss' output order).
    """
    kk = k + bool(self_query)
    extra = min(kk + 1, index.ntotal)
    # compare similarities at the precision they are computed in (float32 for half queries,
    # as faiss), not rounded back to the query's dtype
    query = query.to(_upcast(query.dtype)) if query.is_floating_point() else query
    D, I = index.search(query, extra)
    D, I = D[:, :extra], I[:, :extra]
    keep_D, keep_I = D[:, :kk].clone(), I[:, :kk].clone()
    if extra > kk:
        tied = (D[:, kk] == D[:, kk - 1]) & (I[:, kk] >= 0) & D[:, kk - 1].isfinite()
        for row in tied.nonzero().flatten().tolist():
            all_D, all_I = index.search(query[row : row + 1], index.ntotal)
            values = torch.empty(index.ntotal, dtype=all_D.dtype, device=all_D.device)
            values[all_I[0]] = all_D[0]  # the row's similarities in id order
            v = all_D[0, kk - 1]  # from the same search as ``values`` (same rounding)
            above = (values > v).nonzero().flatten()
            at_least = values >= v
            seen_before = torch.cumsum(at_least, 0) - at_least.to(torch.int64)
            entered = ((values == v) & (seen_before < kk)).nonzero().flatten()
            chosen = torch.cat([above, entered[len(entered) - (kk - len(above)) :]])
            keep_I[row] = chosen.to(keep_I.device)
            keep_D[row] = values[chosen].to(keep_D.dtype)
    if not self_query:
        return keep_I
    rows = torch.arange(len(keep_I), device=keep_I.device).unsqueeze(1)
    is_self = keep_I == rows
    worst = keep_D == keep_D.amin(dim=1, keepdim=True)
    lowest_worst = torch.where(worst, keep_I, torch.iinfo(torch.int64).max).argmin(dim=1)
    drop = torch.where(is_self.any(dim=1), is_self.to(torch.int8).argmax(dim=1), lowest_worst)
    keep = torch.arange(kk, device=keep_I.device).unsqueeze(0) != drop.unsqueeze(1)
    return keep_I[keep].reshape(len(keep_I), k)


def ak_lpe(index: Index, k: int, query: Tensor, *, self_query: bool = False) -> Tensor:
    """Averaged k-NN statistic of the LPE (localised p-value estimation) method.

    With ``K = 3k // 2``: mean of the last ``k`` of the ``K`` nearest-neighbour ``D`` values
    (squared L2 distances or inner products). NaN vector if ``index.ntotal < K + self_query``.

    Returns:
        ``(n_query,)`` tensor with the query's dtype (float32 for non-floating queries).

    """
    K = 3 * k // 2
    n_query = query.shape[0] if query.ndim else 1
    if index.ntotal < K + self_query:
        dtype = query.dtype if query.is_floating_point() else torch.float32
        return torch.full((n_query,), math.nan, dtype=dtype, device=query.device)
    D, _ = index.search(query, K, self_query=self_query)
    return D[:, K - k :].mean(dim=1)
