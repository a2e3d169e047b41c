"""Conformal p-values, Benjamini–Hochberg and valid p-value combinations (tensors only).

Conventions: a *conformity* is higher for more in-distribution inputs. With a holdout of
``n`` in-distribution conformities ``s_1..s_n``, the conformal p-value of a test conformity
``s`` is ``(1 + #{i : s_i <= s}) / (n + 1)``. If the holdout and the test input are
exchangeable, ``P(p <= alpha) <= alpha`` for every ``alpha`` (ties included: ``<=`` counts
them against the test point), see Vovk, Gammerman & Shafer, *Algorithmic Learning in a
Random World* (2005) and Bates, Candès, Lei, Romano & Sesia, "Testing for outliers with
conformal p-values", Annals of Statistics 51(1), 2023. The randomised p-value
``(#{s_i < s} + U (1 + #{s_i = s})) / (n + 1)``, ``U ~ Uniform(0, 1]``, is exactly uniform.

*Groups* (e.g. predicted classes) give Mondrian / class-conditional p-values: ``s`` is
compared with the holdout points of its own group only, so the bound holds within each
group (Vovk et al. 2005, §4.5).

Every function keeps the data on its device and computes in float64 (exact for float16 and
float32 inputs); none loops over samples or groups.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "COMBINATIONS",
    "CombineMethod",
    "benjamini_hochberg",
    "check_alpha",
    "combination_factor",
    "combine_p_values",
    "conformal_p_values",
    "cut_ranks",
    "group_sizes",
    "min_holdout_size",
    "smallest_p_value",
    "sorted_holdout",
]

CombineMethod = Literal["bonferroni", "harmonic"]
COMBINATIONS: tuple[str, ...] = ("bonferroni", "harmonic")


def _float64(x: Tensor) -> Tensor:
    # MPS has no float64: stay in float32 there (exact for float16 / float32 inputs).
    return x.to(torch.float32 if x.device.type == "mps" else torch.float64)


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as a float, or raise ``ValueError`` unless ``0 < alpha < 1``."""
    value = float(alpha)
    if not 0.0 < value < 1.0:
        msg = f"`{name}` must be in (0, 1) (got {alpha!r})"
        raise ValueError(msg)
    return value


# -- holdout preparation -------------------------------------------------------------------
def group_sizes(groups: Tensor, n_groups: int) -> Tensor:
    """Number of holdout points in each group ``0..n_groups-1`` (int64, ``(n_groups,)``)."""
    return torch.bincount(groups, minlength=n_groups)


def sorted_holdout(
    holdout: Tensor, groups: Tensor | None = None, n_groups: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Sort a holdout once, for many :func:`conformal_p_values` calls.

    Args:
        holdout: ``(n,)`` or ``(K, n)`` conformities (``K`` scores on the same inputs).
        groups: ``(n,)`` int64 group of each holdout point (default: one group).
        n_groups: number of groups.

    Returns:
        ``(values, keys, starts)``: ``values`` ``(K, n)`` float64 sorted holdout
        conformities; ``keys`` ``(K, n)`` sorted int64 keys ``group * (n + 1) + rank`` with
        ``rank = #{j : s_j <= s_i}``; ``starts`` ``(n_groups + 1,)`` the number of holdout
        points in the groups before each group.
    """
    values, order = _float64(holdout).reshape(-1, holdout.shape[-1]).sort(dim=1)
    n = values.shape[1]
    if groups is None:
        groups = torch.zeros(n, dtype=torch.int64, device=values.device)
    groups = groups.to(device=values.device, dtype=torch.int64)
    ranks = torch.searchsorted(values, values, right=True)  # #{j : s_j <= s_(i)}
    keys = (groups[order] * (n + 1) + ranks).sort(dim=1).values
    counts = group_sizes(groups, n_groups)
    starts = torch.zeros(n_groups + 1, dtype=torch.int64, device=values.device)
    starts[1:] = counts.cumsum(0)
    return values, keys, starts


def conformal_p_values(
    holdout: Tensor | tuple[Tensor, Tensor, Tensor],
    test: Tensor,
    *,
    holdout_groups: Tensor | None = None,
    test_groups: Tensor | None = None,
    n_groups: int = 1,
    randomize: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Conformal p-values of ``test`` conformities against ``holdout`` conformities.

    Args:
        holdout: ``(n,)`` or ``(K, n)`` in-distribution conformities, or the output of
            :func:`sorted_holdout` (then ``holdout_groups`` / ``n_groups`` are ignored).
        test: ``(m,)`` or ``(K, m)`` conformities (higher = more in-distribution).
        holdout_groups: ``(n,)`` group of each holdout point (class-conditional mode).
        test_groups: ``(m,)`` group of each test point (needed with groups).
        n_groups: number of groups.
        randomize: break ties at random (exactly uniform p-values); else ties count
            against the test point (super-uniform p-values).
        generator: random generator for ``randomize`` (on ``test``'s device).

    Returns:
        float64 p-values in ``(0, 1]``, shaped like ``test``. A test point of a group
        without holdout points gets ``1``.

    Raises:
        ValueError: NaN conformities, or shapes that do not match.
    """
    if isinstance(holdout, tuple):
        values, keys, starts = holdout
        n_groups = len(starts) - 1
    else:
        _check_finite_or_inf(holdout, "holdout")
        values, keys, starts = sorted_holdout(holdout, holdout_groups, n_groups)
    _check_finite_or_inf(test, "test")
    squeeze = test.ndim == 1
    s = _float64(test).reshape(-1, test.shape[-1]).to(values.device)
    if s.shape[0] != values.shape[0]:
        msg = f"`test` has {s.shape[0]} rows of conformities but `holdout` has {values.shape[0]}"
        raise ValueError(msg)
    n, m = values.shape[1], s.shape[1]
    if test_groups is None:
        if n_groups != 1:
            msg = f"`test_groups` is needed with n_groups={n_groups} groups"
            raise ValueError(msg)
        g = torch.zeros(m, dtype=torch.int64, device=values.device)
    else:
        g = test_groups.to(device=values.device, dtype=torch.int64)
        if g.shape != (m,):
            msg = f"`test_groups` must have shape ({m},) (got {tuple(g.shape)})"
            raise ValueError(msg)
    base = (g * (n + 1)).expand_as(s).contiguous()
    start = starts[g]
    size = (starts[1:] - starts[:-1])[g]
    le_key = base + torch.searchsorted(values, s.contiguous(), right=True)
    n_le = torch.searchsorted(keys, le_key, right=True) - start
    denominator = _float64(size + 1)
    if not randomize:
        p = _float64(1 + n_le) / denominator
    else:
        lt_key = base + torch.searchsorted(values, s.contiguous(), right=False)
        n_lt = torch.searchsorted(keys, lt_key, right=True) - start
        u = 1.0 - torch.rand(s.shape, generator=generator, device=s.device, dtype=s.dtype)
        p = (_float64(n_lt) + u * _float64(1 + n_le - n_lt)) / denominator
    return p.squeeze(0) if squeeze else p


def _check_finite_or_inf(conformities: Tensor, name: str) -> None:
    n_nan = int(torch.isnan(conformities).sum())
    if n_nan:
        msg = f"`{name}` has {n_nan} NaN conformities out of {conformities.numel()}"
        raise ValueError(msg)


# -- combination of K p-values for one hypothesis ------------------------------------------
def combination_factor(n_scores: int, method: CombineMethod) -> float:
    """Multiplier making a combination of ``n_scores`` p-values valid under any dependence.

    * ``"bonferroni"``: ``K`` (``K min_k p_k``).
    * ``"harmonic"``: ``e ln K`` for ``K >= 3`` and ``2`` for ``K = 2`` (the harmonic mean
      times this factor is a p-value whatever the dependence between the ``K`` p-values;
      Vovk & Wang, "Combining p-values via averaging", Biometrika 107(4), 2020; for
      ``K = 2``, ``2 H >= 2 min p``, Bonferroni).
    """
    if n_scores < 1:
        msg = f"`n_scores` must be at least 1 (got {n_scores})"
        raise ValueError(msg)
    if method not in COMBINATIONS:
        msg = f"`combine` must be one of {COMBINATIONS} (got {method!r})"
        raise ValueError(msg)
    if n_scores == 1:
        return 1.0
    if method == "bonferroni" or n_scores == 2:
        return float(n_scores)
    return math.e * math.log(n_scores)


def combine_p_values(p: Tensor, method: CombineMethod = "bonferroni") -> Tensor:
    """Combine ``(K, m)`` p-values (``K`` tests of the same hypothesis) into ``(m,)``.

    ``"bonferroni"``: ``min(1, K min_k p_k)``; ``"harmonic"``: ``min(1, c_K H)`` with ``H``
    the harmonic mean and ``c_K`` :func:`combination_factor`. Both are valid p-values under
    arbitrary dependence of the ``K`` p-values (Vovk & Wang 2020). One row is returned as is.
    """
    if p.ndim != 2:
        msg = f"`p` must have shape (K, m) (got {tuple(p.shape)})"
        raise ValueError(msg)
    factor = combination_factor(p.shape[0], method)
    if p.shape[0] == 1:
        return p[0]
    if method == "bonferroni":
        merged = factor * p.min(dim=0).values
    else:
        merged = factor * (p.shape[0] / p.reciprocal().sum(dim=0))
    return merged.clamp(max=1.0)


def smallest_p_value(
    n: Tensor | int, n_scores: int = 1, method: CombineMethod = "bonferroni"
) -> Tensor:
    """Smallest (combined, non-randomised) p-value reachable with ``n`` holdout points."""
    n_t = torch.as_tensor(n, dtype=torch.float64)
    single = 1.0 / (n_t + 1.0)
    return (combination_factor(n_scores, method) * single).clamp(max=1.0)


def min_holdout_size(alpha: float, n_scores: int = 1, method: CombineMethod = "bonferroni") -> int:
    """Smallest holdout size ``n`` for which a p-value can be ``<= alpha``."""
    alpha = check_alpha(alpha)
    n = max(math.ceil(combination_factor(n_scores, method) / alpha) - 1, 0)
    while float(smallest_p_value(n, n_scores, method)) > alpha:
        n += 1
    while n > 0 and float(smallest_p_value(n - 1, n_scores, method)) <= alpha:
        n -= 1
    return n


def cut_ranks(sizes: Tensor, alpha: float, factor: float = 1.0) -> Tensor:
    """Per group, the largest ``j`` with ``min(1, factor * j / (n_c + 1)) <= alpha``.

    A test point of group ``c`` then has a p-value ``<= alpha`` exactly when fewer than
    ``j`` holdout conformities of its group are ``<=`` its own, i.e. when it is below the
    ``j``-th smallest of them (the same float64 operations as the p-values, so the cut and
    the p-values always agree). ``0`` means that no input of the group can be flagged.
    """
    alpha = check_alpha(alpha)
    sizes = sizes.to(torch.int64)
    j = torch.arange(1, int(sizes.max()) + 2 if len(sizes) else 1, device=sizes.device)
    lattice = _float64(j)[None, :] / _float64(sizes + 1)[:, None]
    if factor != 1.0:
        lattice = (factor * lattice).clamp(max=1.0)
    valid = j[None, :] <= (sizes + 1)[:, None]
    return ((lattice <= alpha) & valid).sum(dim=1)


# -- multiple testing over a batch ---------------------------------------------------------
def benjamini_hochberg(p: Tensor, alpha: float) -> Tensor:
    """Benjamini–Hochberg rejections (``(m,)`` bool) at false discovery rate ``alpha``.

    Rejects the ``k`` smallest p-values, ``k = max{j : p_(j) <= j alpha / m}`` (Benjamini &
    Hochberg, JRSS-B 1995). With conformal p-values sharing one holdout (which are PRDS),
    the FDR is at most ``alpha`` (Bates et al. 2023, Theorem 3).
    """
    alpha = check_alpha(alpha)
    if p.ndim != 1:
        msg = f"`p` must have shape (m,) (got {tuple(p.shape)})"
        raise ValueError(msg)
    m = p.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.bool, device=p.device)
    ordered = p.sort().values
    ranks = torch.arange(1, m + 1, device=p.device, dtype=ordered.dtype)
    passing = ordered <= ranks * alpha / m
    k = int(passing.nonzero().max()) + 1 if bool(passing.any()) else 0
    if k == 0:
        return torch.zeros(m, dtype=torch.bool, device=p.device)
    return p <= ordered[k - 1]
