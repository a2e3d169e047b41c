"""Indexes per group of samples (per class, per label) and the recall of an approximate
index against an exact one."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal, TypeAlias, overload

import numpy as np
import torch
from torch import Tensor

from scio.index.bank import ResidualBank
from scio.index.index import Index, IndexBackend, flatten_samples
from scio.utils.enums import IndexMetricLike

__all__ = ["IndexNest", "make_indexes", "recall_at_k"]

IndexNest: TypeAlias = "Index | tuple[IndexNest, ...]"


def _group_indexes(
    samples: Tensor | ResidualBank,
    groups: Tensor | None,
    n_groups: int,
    metric: IndexMetricLike,
    backend: IndexBackend,
) -> tuple[Index, ...]:
    flat = samples if isinstance(samples, ResidualBank) else flatten_samples(samples)
    dim = flat.shape[1]
    chunks: Sequence[Tensor | ResidualBank]
    if groups is None:
        chunks = [flat]
    else:
        groups = groups.detach().reshape(-1).to(flat.device)
        if groups.shape[0] != flat.shape[0]:
            msg = (
                f"Each groups tensor must have one value per sample (got {groups.shape[0]} "
                f"values for {flat.shape[0]} samples)"
            )
            raise ValueError(msg)
        if groups.is_floating_point() or groups.is_complex():
            chunks = [flat[groups == value] for value in range(n_groups)]
        else:
            g = groups.to(torch.int64)
            sel = ((g >= 0) & (g < n_groups)).nonzero().squeeze(1)
            g = g[sel]
            order = g.argsort(stable=True)
            counts = torch.bincount(g, minlength=n_groups).tolist()
            rows = sel[order]
            bounds = np.cumsum([0, *counts]).tolist()
            chunks = [flat[rows[a:b]] for a, b in itertools.pairwise(bounds)]
    out = []
    for chunk in chunks:
        index = Index(dim=dim, metric=metric, backend=backend)
        index.add(chunk)
        out.append(index)
    return tuple(out)


@overload
def make_indexes(
    all_samples: Tensor | ResidualBank,
    all_groups: None = None,
    *,
    n_groups: int | None = None,
    metric: IndexMetricLike,
    squeeze: Literal[True] = True,
    backend: IndexBackend = "torch",
) -> Index: ...


@overload
def make_indexes(
    all_samples: Sequence[Tensor | ResidualBank],
    all_groups: None = None,
    *,
    n_groups: int | None = None,
    metric: IndexMetricLike,
    squeeze: Literal[True] = True,
    backend: IndexBackend = "torch",
) -> tuple[Index, ...]: ...


@overload
def make_indexes(
    all_samples: Tensor | ResidualBank,
    all_groups: Tensor,
    *,
    n_groups: int | None = None,
    metric: IndexMetricLike,
    squeeze: Literal[True] = True,
    backend: IndexBackend = "torch",
) -> tuple[Index, ...]: ...


@overload
def make_indexes(
    all_samples: Tensor | ResidualBank | Sequence[Tensor | ResidualBank],
    all_groups: Tensor | Sequence[Tensor] | None = None,
    *,
    n_groups: int | None = None,
    metric: IndexMetricLike,
    squeeze: bool = True,
    backend: IndexBackend = "torch",
) -> IndexNest: ...


def make_indexes(
    all_samples: Tensor | ResidualBank | Sequence[Tensor | ResidualBank],
    all_groups: Tensor | Sequence[Tensor] | None = None,
    *,
    n_groups: int | None = None,
    metric: IndexMetricLike,
    squeeze: bool = True,
    backend: IndexBackend = "torch",
) -> IndexNest:
    """Build one :class:`Index` per (groups tensor, samples tensor, group value).

    The index for group value ``g`` holds the samples whose group equals ``g``, in their
    original order (empty groups give empty indexes). The result is nested as
    ``groups tensors → samples tensors → group values``. With ``squeeze``, the groups level is
    dropped if ``all_groups`` is a tensor or ``None``, the samples level if ``all_samples`` is a
    tensor, and the group-value level if ``all_groups`` is ``None`` (then ``n_groups=1``).

    Example: ``make_indexes(acts, metric="l2")`` → one ``Index``;
    ``make_indexes((acts1, acts2), labels, n_groups=C, metric="ip")`` → ``((Index,)*C,)*2``.

    Raises:
        ValueError: ``all_groups`` is given but ``n_groups`` is not a positive integer.

    """
    single = isinstance(all_samples, Tensor | ResidualBank)
    samples_seq = (all_samples,) if single else tuple(all_samples)  # type: ignore[arg-type]
    groups_seq: tuple[Tensor | None, ...]
    if all_groups is None:
        groups_seq, n = (None,), 1
    else:
        if (
            isinstance(n_groups, bool)
            or not isinstance(n_groups, int | np.integer)
            or n_groups <= 0
        ):
            msg = (
                "Since `all_groups is not None`, `n_groups` must be a positive integer "
                f"(got {n_groups})"
            )
            raise ValueError(msg)
        n = int(n_groups)
        groups_seq = (all_groups,) if isinstance(all_groups, Tensor) else tuple(all_groups)

    squeeze_values = squeeze and all_groups is None
    squeeze_samples = squeeze and single
    squeeze_groups = squeeze and (all_groups is None or isinstance(all_groups, Tensor))

    def per_samples(samples: Tensor | ResidualBank, groups: Tensor | None) -> IndexNest:
        indexes = _group_indexes(samples, groups, n, metric, backend)
        return indexes[0] if squeeze_values else indexes

    def per_groups(groups: Tensor | None) -> IndexNest:
        level = tuple(per_samples(samples, groups) for samples in samples_seq)
        return level[0] if squeeze_samples else level

    top = tuple(per_groups(groups) for groups in groups_seq)
    return top[0] if squeeze_groups else top


def recall_at_k(index: Index, reference: Index, queries: Tensor, k: int) -> float:
    """Mean fraction of the ``k`` true nearest neighbours (from ``reference``, usually the
    exact index over the same samples) that ``index`` returns for ``queries``."""
    found = index.search(queries, k)[1]
    truth = reference.search(queries, k)[1]
    hits = (found[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)
    return float(hits.any(dim=1).sum()) / max(1, int((truth >= 0).sum()))
