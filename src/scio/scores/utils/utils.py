"""Tensor helpers shared by the scores (pure tensor math, device and dtype preserving)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any, Literal, TypeAlias, cast, overload

import torch
from torch import Tensor

from scio.utils.enums import AggrName, AggrNameLike

__all__ = [
    "Aggregator",
    "batched_grad",
    "fgm_direction",
    "get_aggregator",
    "normalize_samples",
    "torch_quantile",
]

Aggregator: TypeAlias = Callable[..., Tensor]
Interpolation: TypeAlias = Literal["linear", "lower", "higher", "midpoint", "nearest"]

_INTERPOLATIONS = ("linear", "lower", "higher", "midpoint", "nearest")


def _upcast(dtype: torch.dtype) -> torch.dtype:
    """Dtype used for internal computations: half precision types go through float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _flat_samples(t: Tensor, start: int) -> Tensor:
    """Reshape to ``(*t.shape[:start], sample_size)`` (sample of size 1 if ``start == ndim``)."""
    return t.reshape(*t.shape[:start], math.prod(t.shape[start:]))


def _result_float_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype.is_floating_point else torch.float32


# ---------------------------------------------------------------------------------------------
# normalize_samples
# ---------------------------------------------------------------------------------------------


def normalize_samples(
    t: Tensor, *, ord: float | None, same_inf: bool = False, sample_start_dim: int = 1
) -> Tensor:
    """Divide each sample by its ``ord``-vector-norm.

    A sample is made of the dimensions from ``sample_start_dim`` on (flattened). Samples of zero
    norm (``ord > 0``) or infinite norm (``ord < 0``) are returned unchanged. Degenerate samples
    (infinite norm for ``ord > 0``, caused by infinite entries; zero norm for ``ord < 0``, caused
    by zero entries) are replaced by their limit: the ``s`` singular entries become
    ``±1 / s**(1/ord)`` (sign from the signbit, so ``-0.0`` is negative), the others ``±0``
    (``ord > 0``) or ``±inf`` (``ord < 0``) with their own sign. Without ``same_inf``,
    degenerate samples with ``s != 1`` become all-NaN. Half precision is computed in float32,
    and norms never overflow or underflow (samples are rescaled first).

    ``ord=None`` returns ``t`` itself.

    Raises:
        TypeError: ``t`` is not of floating dtype.
        ValueError: ``ord == 0``.

    """
    if not t.is_floating_point():
        msg = f"Input tensor should be of floating dtype (got {t.dtype})"
        raise TypeError(msg)
    if ord is None:
        return t
    if ord == 0:
        msg = "Normalization order cannot be zero"
        raise ValueError(msg)
    start = sample_start_dim + t.ndim if sample_start_dim < 0 else sample_start_dim
    if not 0 <= start <= t.ndim:
        msg = f"`sample_start_dim` out of range for a {t.ndim}D tensor (got {sample_start_dim})"
        raise IndexError(msg)
    work = _flat_samples(t, start).to(_upcast(t.dtype))
    # Samples are first scaled by their largest (ord > 0) or smallest (ord < 0) magnitude, so
    # that computing the norm never overflows nor underflows. That magnitude also tells the
    # zero-norm / infinite-norm / degenerate cases apart.
    absw = work.abs()
    if ord > 0:
        scale = absw.amax(dim=-1, keepdim=True)
        unchanged, degenerate, singular = scale == 0, scale.isinf(), work.isinf()
    else:
        scale = absw.amin(dim=-1, keepdim=True)
        unchanged, degenerate, singular = scale.isinf(), scale == 0, work == 0
    special = unchanged | degenerate
    scaled = work / torch.where(special, 1.0, scale)
    norm = torch.linalg.vector_norm(scaled, ord=ord, dim=-1, keepdim=True)
    # safe denominator: special samples stay as they are and gradients stay finite
    out = scaled / torch.where(special, 1.0, norm)
    if torch.compiler.is_exporting() or bool(degenerate.any()):  # no data-dependent branch
        s = singular.sum(dim=-1, keepdim=True).to(work.dtype)
        sign = torch.where(work.signbit(), -1.0, 1.0).to(work.dtype)
        other = 0.0 if ord > 0 else math.inf
        limit = torch.where(singular, sign / s ** (1 / ord), sign * other)
        if not same_inf:
            limit = limit.masked_fill(s != 1, math.nan)
        out = torch.where(degenerate, limit, out)
    return out.to(t.dtype).reshape(t.shape)


# ---------------------------------------------------------------------------------------------
# get_aggregator
# ---------------------------------------------------------------------------------------------


def _reduce_over(t: Tensor, dim: int | Sequence[int] | None) -> tuple[Tensor, int]:
    """Move the reduced dimensions to a single last one."""
    if dim is None:
        return t.reshape(-1), 0
    if isinstance(dim, int):
        return t, dim
    dims = tuple(dim)
    moved = t.movedim(dims, tuple(range(-len(dims), 0)))
    return moved.flatten(-len(dims)) if dims else moved.unsqueeze(-1), -1


def get_aggregator(aggr_or_ord: AggrNameLike | float) -> Aggregator:
    """Aggregation function ``f(t, dim=None) -> Tensor`` reducing ``dim`` (all if ``None``).

    A real number gives the vector norm of that order. Names: ``fisher`` (sum of logs),
    ``geometric`` (exp of mean log), ``harmonic`` (1 / mean(1/x)), ``max``, ``mean``, ``min``,
    ``prod``, ``sum``.

    Raises:
        ValueError: Unknown aggregation name.

    """
    if not isinstance(aggr_or_ord, str) and isinstance(aggr_or_ord, Real):
        order = float(aggr_or_ord)

        def norm(t: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
            t, d = _reduce_over(t, dim)
            return torch.linalg.vector_norm(t, ord=order, dim=d)

        return norm

    name = AggrName(cast(str, aggr_or_ord))
    ops: dict[AggrName, Callable[[Tensor, int], Tensor]] = {
        AggrName.FISHER: lambda t, d: t.log().sum(dim=d),
        AggrName.GEOMETRIC: lambda t, d: t.log().mean(dim=d).exp(),
        AggrName.HARMONIC: lambda t, d: t.reciprocal().mean(dim=d).reciprocal(),
        AggrName.MAX: lambda t, d: t.amax(dim=d),
        AggrName.MEAN: lambda t, d: t.mean(dim=d),
        AggrName.MIN: lambda t, d: t.amin(dim=d),
        AggrName.PROD: lambda t, d: t.prod(dim=d),
        AggrName.SUM: lambda t, d: t.sum(dim=d),
    }
    if name not in ops:
        msg = f"Unsupported aggregation: {name!r}"
        raise ValueError(msg)
    op = ops[name]

    def aggregate(t: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
        t, d = _reduce_over(t, dim)
        return op(t, d)

    aggregate.__name__ = f"aggregate_{name.value}"
    return aggregate


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@overload
def batched_grad(outputs: Tensor, inputs: Tensor, *, retain_graph: bool = False) -> Tensor: ...


@overload
def batched_grad(
    outputs: Tensor, inputs: Sequence[Tensor], *, retain_graph: bool = False
) -> tuple[Tensor, ...]: ...


def batched_grad(
    outputs: Tensor, inputs: Tensor | Sequence[Tensor], *, retain_graph: bool = False
) -> Tensor | tuple[Tensor, ...]:
    """Gradient of ``outputs.sum()`` w.r.t. ``inputs`` (``autograd.grad`` with ones as
    ``grad_outputs``): per-sample gradients when samples are independent.

    Returns a tensor for a tensor ``inputs``, a tuple for a sequence of tensors.
    """
    grads = torch.autograd.grad(
        outputs, inputs, grad_outputs=torch.ones_like(outputs), retain_graph=retain_graph
    )
    return grads[0] if isinstance(inputs, Tensor) else tuple(grads)


def fgm_direction(grad: Tensor, *, p: float = math.inf, check: bool = True) -> Tensor:
    """Fast Gradient Method direction: per sample (dim 0 = batch), the unit ``p``-norm
    direction ``d`` maximising ``<grad, d>`` (Goodfellow et al., ICLR 2015, for ``p = inf``).

    Entries with ``|g| <= eps(dtype)`` are zeroed **in place** in ``grad``. ``p = inf`` →
    ``sign(g)``; ``1 < p < inf`` → ``normalize(|g|, ord=q)**(q-1) · sign(g)`` with
    ``q = p/(p-1)``; ``p = 1`` → the mass split equally over the max-``|g|`` coordinates, with
    their sign. Zero gradients give zero directions. As in the reference, the direction and its
    norm check are computed in ``grad``'s own dtype (so half precision can fail the check).

    Args:
        grad: Gradients, samples along the first dimension.
        p: Norm order, ``p >= 1``.
        check: Assert that each output's ``p``-norm is 1 (0 for zero gradients), with
            ``torch.testing.assert_close`` tolerances (half: ``atol=1e-3, rtol=3e-3``).

    Raises:
        ValueError: Non-finite gradient or ``p < 1``.
        AssertionError: ``check`` failed (numerical instability).

    """
    if not bool(grad.isfinite().all()):
        msg = "Only finite gradients are allowed"
        raise ValueError(msg)
    if not p >= 1:
        msg = f"Parameter p must satisfy `p>=1` (got {p!r})"
        raise ValueError(msg)
    grad.masked_fill_(grad.abs() <= torch.finfo(grad.dtype).eps, 0)
    g = grad
    start = min(1, g.ndim)
    if p == math.inf:
        direction = g.sign()
    elif p == 1:
        absg = _flat_samples(g, start).abs()
        is_max = absg == absg.amax(dim=-1, keepdim=True)
        count = is_max.sum(dim=-1, keepdim=True)
        direction = (g.sign() * (is_max / count).to(g.dtype).reshape(g.shape)).to(g.dtype)
    else:
        q = p / (p - 1)
        direction = normalize_samples(g.abs(), ord=q, sample_start_dim=start) ** (q - 1)
        direction = direction * g.sign()
    if check:
        _check_unit_norm(direction, grad, p, start)
    return direction


def _check_unit_norm(direction: Tensor, grad: Tensor, p: float, start: int) -> None:
    norms = torch.linalg.vector_norm(_flat_samples(direction, start), ord=p, dim=-1)
    nonzero = _flat_samples(grad, start).ne(0).any(dim=-1)
    expected = nonzero.to(norms.dtype)
    tol: dict[str, Any] = {}
    if direction.dtype == torch.float16:
        tol = {"atol": 1e-3, "rtol": 3e-3}
    try:
        torch.testing.assert_close(norms, expected, **tol)
    except AssertionError as exc:
        msg = (
            f"{exc}\n\nThe {p}-norm of the FGM direction should be 1 (or 0 for null "
            "gradients), which failed. This is likely due to computational approximations. "
            "Consider using p=1 if p is too close to 1"
        )
        raise AssertionError(msg) from exc


# ---------------------------------------------------------------------------------------------
# torch_quantile
# ---------------------------------------------------------------------------------------------


def torch_quantile(
    t: Tensor,
    q: float,
    dim: int | None = None,
    *,
    keepdim: bool = False,
    interpolation: Interpolation = "nearest",
    out: Tensor | None = None,
) -> Tensor:
    """Clone of ``torch.quantile`` for a scalar ``q``, based on ``kthvalue``.

    Same results as ``torch.quantile`` (NaN if the reduced slice has a NaN), but without its
    input size limit, with float16 support, and usable in deterministic-algorithms mode (which
    is temporarily disabled). Note the default ``interpolation="nearest"``.

    Raises:
        ValueError: ``q`` outside ``[0, 1]``, unsupported ``interpolation``, or ``out`` given.
        TypeError: ``t`` is not of floating dtype.
        RuntimeError: ``t`` is empty.

    """
    q_float = float(q)
    if not 0 <= q_float <= 1:
        msg = f"Only values 0<=q<=1 are supported (got {q_float!r})"
        raise ValueError(msg)
    if interpolation not in _INTERPOLATIONS:
        msg = (
            "Currently supported interpolations are {'linear', 'lower', 'higher', 'midpoint', "
            f"'nearest'}} (got {interpolation!r})"
        )
        raise ValueError(msg)
    if out is not None:
        msg = f"Only None value is currently supported for out (got {out!r})"
        raise ValueError(msg)
    if not t.is_floating_point():
        msg = f"Input tensor should be of floating dtype (got {t.dtype})"
        raise TypeError(msg)
    if t.numel() == 0:
        msg = "quantile() input tensor must be non-empty"
        raise RuntimeError(msg)

    if dim is None:
        x, red = t.reshape(-1), 0
    else:
        x = t.reshape(1) if t.ndim == 0 else t
        red = dim % x.ndim if -x.ndim <= dim < x.ndim else dim  # invalid dim: torch raises
    n = x.shape[red]

    # Same rank arithmetic as torch.quantile (performed in the input dtype).
    rank = torch.tensor(q_float, dtype=t.dtype) * (n - 1)
    if interpolation == "lower":
        rank = rank.floor()
    elif interpolation == "higher":
        rank = rank.ceil()
    elif interpolation == "nearest":
        rank = rank.round()
    rank = rank.clamp(0, n - 1)
    below = int(rank.floor())
    above = int(rank.ceil())

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if deterministic:
        torch.use_deterministic_algorithms(False)
    try:
        result = x.kthvalue(below + 1, dim=red, keepdim=True).values
        if interpolation in ("linear", "midpoint") and above != below:
            upper = x.kthvalue(above + 1, dim=red, keepdim=True).values
            weight = 0.5 if interpolation == "midpoint" else rank - below
            weight_t = torch.as_tensor(weight, dtype=t.dtype, device=t.device)
            result = torch.lerp(result, upper, weight_t)
    finally:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)
    result = result.masked_fill(x.isnan().any(dim=red, keepdim=True), math.nan)

    if dim is None:
        return result.reshape((1,) * t.ndim) if keepdim else result.reshape(())
    if t.ndim == 0 or not keepdim:
        return result.squeeze(red) if t.ndim else result.reshape(())
    return result
