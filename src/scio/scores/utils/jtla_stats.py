"""JTLA's test statistics and joint p-values (Raghuram et al., ICML 2021), by bounded chunks.

Pure tensor math behind :class:`scio.scores.classification.jtla.JTLA`: the multinomial test
statistic of every class for observed neighbour-label counts, and the p-values of layer
subsets against calibration statistics. Both bound their intermediate blocks (see
``_MAX_TEST_ELEMENTS`` and ``_MAX_COMPARE_ELEMENTS``); results do not depend on the bounds.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from scio.scores.utils.stats import dirmult_surprise, kldiv
from scio.utils.enums import MultinomialTestMode

__all__ = ["layer_subsets", "multinomial_tests", "subset_pvalues"]

#: Elements of one ``(C, chunk, C)`` block of test statistics.
_MAX_TEST_ELEMENTS = 2**24
#: Elements of one ``(C, chunk, n_calib, L)`` block of joint comparisons.
_MAX_COMPARE_ELEMENTS = 2**26


def layer_subsets(n_layers: int, size: int, *, consecutive: bool) -> list[tuple[int, ...]]:
    """Subsets of ``size`` layers: every combination, or consecutive windows only."""
    if consecutive:
        return [tuple(range(i, i + size)) for i in range(n_layers - size + 1)]
    return list(itertools.combinations(range(n_layers), size))


def multinomial_tests(obs: Tensor, params: Tensor, mode: MultinomialTestMode) -> Tensor:
    """Test statistics of every class at once (vectorised
    :func:`scio.scores.utils.multinomial_test`).

    Args:
        obs: ``(n, C)`` observed neighbour-label counts (NaN rows allowed).
        params: ``(C, C)`` per-class parameter, row ``c`` for class ``c``: the expected
            counts (``mle``: ``S_c``, ``map``: ``S_c + prior_c - 1``) or the Dirichlet
            parameter (``dcm``: ``S_c + prior_c``), ``S_c`` being the summed reference counts.
        mode: the test mode.

    Returns:
        ``(C, n)`` statistics in ``params``' dtype, high = deviant, NaN and ``+inf`` → ``+inf``.
        As in the reference, ``obs`` keeps its dtype (int64 counts) and ``params`` the
        activations' dtype, so every test is computed with the reference's dtypes.

    """
    params = params.to(device=obs.device)
    n_classes = params.shape[0]
    chunk = max(1, _MAX_TEST_ELEMENTS // max(1, n_classes * n_classes))
    if mode in (MultinomialTestMode.MLE, MultinomialTestMode.MAP):
        # kldiv makes the whole result NaN if any expected value is bad: isolate classes.
        bad = (params.isnan() | (params < 0)).any(dim=1, keepdim=True)
        safe = params.masked_fill(bad, 1.0).unsqueeze(1)

        def stat(o: Tensor) -> Tensor:
            return kldiv(o.unsqueeze(0), safe).masked_fill(bad, math.nan)

    elif mode == MultinomialTestMode.DCM:
        alpha = params.unsqueeze(1)

        def stat(o: Tensor) -> Tensor:
            return dirmult_surprise(o.unsqueeze(0), alpha)

    else:
        msg = f"Unsupported mode: {mode!r}"
        raise ValueError(msg)
    if torch.compiler.is_exporting():  # one chunk: the batch size stays symbolic
        values = stat(obs)
    else:
        parts = [stat(obs[i : i + chunk]) for i in range(0, len(obs), chunk)]
        values = torch.cat(parts, dim=1) if parts else obs.new_zeros((n_classes, 0))
    return values.masked_fill(values.isnan() | (values == math.inf), math.inf)


def subset_pvalues(
    query: Tensor,
    calib: Tensor | None,
    calib_sorted: Tensor | None,
    subsets: list[tuple[int, ...]],
) -> Tensor:
    """Joint p-values: fraction of calibration samples at least as extreme on all layers.

    Args:
        query: ``(C, nq, L)`` query test values.
        calib: ``(C, L, n)`` calibration test values (needed for subsets of size > 1).
        calib_sorted: ``(C, L, n)`` calibration values sorted along the last axis (needed
            for single layers, answered with ``searchsorted``).
        subsets: layer subsets.

    Returns:
        ``(C, nq, len(subsets))`` float64 p-values.

    """
    n_classes, nq, _ = query.shape
    singles = [s for s in subsets if len(s) == 1]
    joints = [s for s in subsets if len(s) > 1]
    results: dict[tuple[int, ...], Tensor] = {}
    if singles:
        assert calib_sorted is not None
        n = calib_sorted.shape[-1]
        values = query.transpose(1, 2).contiguous()  # (C, L, nq)
        below = torch.searchsorted(calib_sorted, values, side="left")
        p_single = (n - below).to(torch.float64) / n  # (C, L, nq)
        for single in singles:
            results[single] = p_single[:, single[0]]
    if joints:
        assert calib is not None
        n = calib.shape[-1]
        used = sorted({layer for joint in joints for layer in joint})
        chunk = max(1, _MAX_COMPARE_ELEMENTS // max(1, n_classes * n * len(used)))
        parts: dict[tuple[int, ...], list[Tensor]] = {s: [] for s in joints}
        starts: range | list[int] = range(0, nq, chunk)
        if torch.compiler.is_exporting():  # one chunk: the batch size stays symbolic
            starts, chunk = [0], nq
        for start in starts:
            q = query[:, start : start + chunk]
            # ge[l]: (C, chunk, n), calibration value >= query value at layer l
            ge = {l: calib[:, l].unsqueeze(1) >= q[:, :, l].unsqueeze(2) for l in used}
            for joint in joints:
                mask = ge[joint[0]]
                for layer in joint[1:]:
                    mask = mask & ge[layer]
                parts[joint].append(mask.sum(dim=-1))
        for joint in joints:
            results[joint] = torch.cat(parts[joint], dim=1).to(torch.float64) / n
    if not subsets:
        return query.new_zeros((n_classes, nq, 0), dtype=torch.float64)
    return torch.stack([results[s] for s in subsets], dim=-1)
