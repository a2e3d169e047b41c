"""Multinomial statistics: KL divergence, Dirichlet-multinomial surprise, multinomial tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scio.scores.utils.utils import _result_float_dtype
from scio.utils.enums import MultinomialTestMode, MultinomialTestModeLike

__all__ = ["dirmult_surprise", "kldiv", "multinomial_test"]


def kldiv(inputs: Tensor, expected: Tensor) -> Tensor:
    """Kullback-Leibler divergence ``KL(inputs ‖ expected)`` along the last axis.

    Both are first normalised to sum 1 along the last axis (they broadcast), each in its own
    dtype (integer counts divide to the default float dtype), then cast to the result dtype, as
    the reference does. ``0·log 0`` terms count as 0, ``q = 0 < p`` gives ``inf``. A row of
    ``inputs`` with a NaN or negative value gives NaN; a NaN or negative value in ``expected``
    (or an all-zero ``expected``) makes every result compared to that row NaN. The result has
    the promoted floating dtype (float32 if both are integer).

    Raises:
        ValueError: ``expected`` is a scalar.

    """
    if expected.ndim == 0:
        msg = "`expected` must be at least a 1D tensor (got scalar)"
        raise ValueError(msg)
    dtype = _result_float_dtype(inputs, expected)
    expected = expected.to(device=inputs.device)
    q = (expected / expected.sum(dim=-1, keepdim=True)).to(dtype)
    p = (inputs / inputs.sum(dim=-1, keepdim=True)).to(dtype)
    # xlogy(p, p) - p·log q (torch's kl_div), with 0·log 0 = 0 and p > 0 = q giving +inf
    terms = torch.nn.functional.kl_div(q.log(), p, reduction="none")
    result = terms.nan_to_num(nan=0.0, posinf=math.inf).sum(dim=-1)
    bad_rows = (p.isnan() | (p < 0)).any(dim=-1)
    # an invalid expected distribution (e.g. all zero) invalidates every row compared to it
    bad_expected = (q.isnan() | (q < 0)).any(dim=-1)
    return result.masked_fill(bad_rows | bad_expected, math.nan)


def dirmult_surprise(counts: Tensor, alpha: Tensor | float) -> Tensor:
    """Negative log-likelihood of ``counts`` under a Dirichlet-multinomial of parameter ``alpha``.

    ``lnΓ(n+A) - lnΓ(n+1) - lnΓ(A) + Σ lnΓ(α_i) + Σ lnΓ(c_i+1) - Σ lnΓ(c_i+α_i)`` along the
    last axis, with ``n = Σ c_i`` and ``A = Σ α_i`` (``alpha`` broadcasts against ``counts``).
    Computed in the reference's order and dtypes: each ``lnΓ`` term in the dtype of its own
    argument (integer counts give default-float ``lnΓ(c+1)``, ``c + α`` the promoted dtype),
    the constant part first, then the count terms; the result is cast to the promoted floating
    dtype of ``counts`` and ``alpha`` (float32 if both are integer).

    Raises:
        ValueError: ``counts`` is a scalar, or its sums along the last axis are not constant.

    """
    if counts.ndim == 0:
        msg = "`counts` must be at least a 1D tensor (got scalar)"
        raise ValueError(msg)
    alpha_t = torch.as_tensor(alpha, device=counts.device)
    if alpha_t.ndim == 0:
        alpha_t = alpha_t.expand(counts.shape[-1])
    totals = counts.sum(dim=-1)
    known = totals[~totals.isnan()] if totals.is_floating_point() else totals.reshape(-1)
    if known.numel() and bool((known != known[0]).any()):
        msg = "`counts` must have constant sum along last axis"
        raise ValueError(msg)
    dtype = _result_float_dtype(counts, alpha_t)
    gln = torch.special.gammaln
    n = totals.unsqueeze(-1)  # (*batch, 1), counts' dtype (the reference's scalar ``n``)
    a = alpha_t.sum(dim=-1, keepdim=True)
    constant = gln(n + a) - gln(n + 1) - gln(a) + gln(alpha_t).sum(dim=-1, keepdim=True)
    count_terms = gln(counts + 1).sum(dim=-1, keepdim=True)
    if counts.ndim > 1:
        # The reference's constant is a 0-dim tensor, so adding it to the batched count terms
        # takes *their* dtype (torch's promotion of 0-dim tensors): e.g. float32 lnΓ(c + 1) of
        # integer counts make the whole sum float32 even for float64 ``alpha``.
        constant = constant.to(torch.result_type(constant[(0,) * constant.ndim], count_terms))
    result = constant + count_terms
    result = result - gln(counts + alpha_t).sum(dim=-1, keepdim=True)
    return result.squeeze(-1).to(dtype)


def multinomial_test(
    counts: Tensor, prior: Tensor | float, mode: MultinomialTestModeLike
) -> Callable[[Tensor], Tensor]:
    """Statistical test of observed neighbour-label counts against reference ``counts``.

    With ``S`` the reference counts summed over the batch (all but the last axis):
    ``mle`` → ``kldiv(obs, S)``; ``map`` → ``kldiv(obs, S + prior - 1)``;
    ``dcm`` → ``dirmult_surprise(obs, S + prior)``. High values = deviant.

    Returns:
        The test, a callable ``obs -> Tensor`` reducing the last axis of ``obs``.

    Raises:
        ValueError: ``counts`` is a scalar, or invalid / unsupported ``mode``.

    """
    if counts.ndim == 0:
        msg = "`counts` must be at least a 1D tensor (got scalar)"
        raise ValueError(msg)
    member = MultinomialTestMode(mode)
    total = counts.reshape(-1, counts.shape[-1]).sum(dim=0)
    if member == MultinomialTestMode.MLE:
        expected = total
        return lambda obs: kldiv(obs, expected)
    if member == MultinomialTestMode.MAP:
        expected = total + prior - 1
        return lambda obs: kldiv(obs, expected)
    if member == MultinomialTestMode.DCM:
        alpha = total + prior
        return lambda obs: dirmult_surprise(obs, alpha)
    msg = f"Unsupported mode: {mode!r}"
    raise ValueError(msg)
