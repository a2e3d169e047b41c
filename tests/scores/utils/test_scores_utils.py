"""Tensor helpers of ``scio.scores.utils`` against independent numpy / scipy / loop computations."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import scio.scores.utils.stats as stats_module
import scio.scores.utils.utils as utils_module
from scio.scores.utils import (
    Index,
    ak_lpe,
    batched_grad,
    dirmult_surprise,
    fgm_direction,
    get_aggregator,
    kldiv,
    knn_label_count,
    make_indexes,
    multinomial_test,
    normalize_samples,
    torch_quantile,
)
from scio.utils.enums import EnumWithExplicitSupport

DTYPES = (torch.float16, torch.float32, torch.float64)
INF, NAN = math.inf, math.nan


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float16: {"atol": 1e-3, "rtol": 3e-3},
        torch.float32: {"atol": 1e-5, "rtol": 1.3e-6},
        torch.float64: {"atol": 1e-7, "rtol": 1e-7},
    }[dtype]


def randn(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------
# normalize_samples
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", [1, 2, 3.5, INF, 0.5, -1, -2, -INF])
@pytest.mark.parametrize(("shape", "start"), [((5, 4), 1), ((3, 2, 3), 1), ((3, 2, 3), 2),
                                              ((3, 2, 3), 0), ((4, 3), -1), ((4,), 1)])  # fmt: skip
def test_normalize_samples_unit_norm(
    shape: tuple[int, ...], start: int, ord: float, dtype: torch.dtype
) -> None:
    t = randn(0, *shape, dtype=dtype)
    original = t.clone()
    out = normalize_samples(t, ord=ord, sample_start_dim=start)
    assert out.shape == t.shape
    assert out.dtype == dtype
    assert torch.equal(t, original)
    # independent reference: numpy, sample by sample
    start_pos = start % (t.ndim + 1) if start < 0 else start
    if start < 0:
        start_pos = t.ndim + start
    arr = t.double().numpy().reshape(*shape[:start_pos], -1)
    flat = arr.reshape(-1, arr.shape[-1])
    expected = np.empty_like(flat)
    for i, sample in enumerate(flat):
        absx = np.abs(sample)
        if ord == INF:
            norm = absx.max()
        elif ord == -INF:
            norm = absx.min()
        else:
            norm = (absx**ord).sum() ** (1 / ord)
        expected[i] = sample / norm
    expected_t = torch.from_numpy(expected.reshape(shape))
    torch.testing.assert_close(out.double(), expected_t, **tol(dtype))


def test_normalize_samples_none_zero_and_dtype_errors() -> None:
    t = torch.rand(3, 2)
    assert normalize_samples(t, ord=None) is t
    with pytest.raises(ValueError, match="^Normalization order cannot be zero$"):
        normalize_samples(t, ord=0)
    with pytest.raises(ValueError, match="^Normalization order cannot be zero$"):
        normalize_samples(t, ord=0.0)
    with pytest.raises(TypeError, match=re.escape("floating dtype (got torch.int64)")):
        normalize_samples(torch.ones(2, 2, dtype=torch.int64), ord=2)
    with pytest.raises(TypeError, match="^Input tensor should be of floating dtype"):
        normalize_samples(torch.ones(2, 2, dtype=torch.int64), ord=None)


# Explicit table: (ord, same_inf, sample) -> expected
NORMALIZE_TABLE = [
    # ord > 0, zero samples unchanged
    (1, False, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
    (2, True, [0.0, -0.0], [0.0, -0.0]),
    # ord > 0, one infinite entry: ±1 there, 0 elsewhere (with or without same_inf)
    (1, False, [1.0, -INF, 3.0], [0.0, -1.0, 0.0]),
    (1, True, [1.0, INF, -3.0], [0.0, 1.0, -0.0]),
    (2, False, [INF, 2.0], [1.0, 0.0]),
    # ord > 0, several infinite entries: NaN, or 1/s**(1/ord) with same_inf
    (1, False, [INF, -INF, 2.0], [NAN, NAN, NAN]),
    (1, True, [INF, -INF, 2.0], [0.5, -0.5, 0.0]),
    (2, True, [INF, INF], [2**-0.5, 2**-0.5]),
    (INF, True, [INF, 1.0, -INF], [1.0, 0.0, -1.0]),
    # ord < 0, infinite-norm samples unchanged (all entries infinite)
    (-1, False, [INF, -INF], [INF, -INF]),
    # ord < 0, zero entries are singular: ±1/s**(1/ord) there, ±inf elsewhere
    (-1, False, [0.0, 2.0, -3.0], [1.0, INF, -INF]),
    (-1, False, [-0.0, 2.0], [-1.0, INF]),  # signbit: -0.0 is negative
    (-1, False, [0.0, -0.0, 2.0], [NAN, NAN, NAN]),
    (-1, True, [0.0, -0.0, 2.0], [2.0, -2.0, INF]),
    (-2, True, [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]),
    (-INF, True, [0.0, -0.0, 5.0], [1.0, -1.0, INF]),
    # regular samples for comparison
    (1, False, [1.0, -3.0], [0.25, -0.75]),
    (-1, True, [1.0, -1.0], [2.0, -2.0]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("ord", "same_inf", "sample", "expected"), NORMALIZE_TABLE)
def test_normalize_samples_explicit(
    ord: float, same_inf: bool, sample: list[float], expected: list[float], dtype: torch.dtype
) -> None:
    t = torch.tensor([sample, [1.0] * len(sample)], dtype=dtype)
    out = normalize_samples(t, ord=ord, same_inf=same_inf)
    expected_t = torch.tensor(expected, dtype=dtype)
    torch.testing.assert_close(out[0], expected_t, equal_nan=True, **tol(dtype))
    # signs (including signed zeros) follow the table
    finite = ~expected_t.isnan()
    assert torch.equal(out[0][finite].signbit(), expected_t[finite].signbit())
    # the regular second sample is unaffected
    ones = torch.ones(len(sample), dtype=torch.float64)
    ref = ones if abs(ord) == INF else ones / len(sample) ** (1 / ord)
    torch.testing.assert_close(out[1].double(), ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", [2, 3, -2, 0.5])
def test_normalize_samples_no_overflow_nor_underflow(ord: float, dtype: torch.dtype) -> None:
    finfo = torch.finfo(dtype)
    big, small = finfo.max / 2, finfo.tiny * 4  # |x|**ord over/underflows for these
    t = torch.tensor([[big, big, big, big], [small, small, small, small]], dtype=dtype)
    out = normalize_samples(t, ord=ord)
    expected = torch.full((2, 4), 4 ** (-1 / ord), dtype=dtype)
    torch.testing.assert_close(out, expected, **tol(dtype))


def test_normalize_samples_gradient_stays_finite() -> None:
    t = torch.tensor([[0.0, 0.0], [3.0, 4.0]], requires_grad=True)
    normalize_samples(t, ord=2).sum().backward()
    assert t.grad is not None
    assert t.grad.isfinite().all()
    torch.testing.assert_close(t.grad[0], torch.ones(2))  # zero samples: identity


def test_normalize_samples_batch_dims() -> None:
    t = randn(1, 2, 3, 4)
    out = normalize_samples(t, ord=2, sample_start_dim=2)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# get_aggregator
# ---------------------------------------------------------------------------------------------

NUMPY_AGGREGATORS = {
    "fisher": lambda a, axis: np.log(a).sum(axis=axis),
    "geometric": lambda a, axis: scipy.stats.gmean(a, axis=axis),
    "harmonic": lambda a, axis: scipy.stats.hmean(a, axis=axis),
    "max": lambda a, axis: a.max(axis=axis),
    "mean": lambda a, axis: a.mean(axis=axis),
    "min": lambda a, axis: a.min(axis=axis),
    "prod": lambda a, axis: a.prod(axis=axis),
    "sum": lambda a, axis: a.sum(axis=axis),
}


@pytest.mark.parametrize("dim", [0, 1, -1, (0, 2), None])
@pytest.mark.parametrize("name", list(NUMPY_AGGREGATORS))
def test_get_aggregator_names(name: str, dim: Any) -> None:
    t = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = t + 0.1
    aggregate = get_aggregator(name)
    out = aggregate(t, dim=dim)
    arr = t.numpy()
    if dim is None:
        expected = NUMPY_AGGREGATORS[name](arr.reshape(-1), 0)
    elif isinstance(dim, tuple):
        moved = np.moveaxis(arr, dim, (-2, -1)).reshape(*arr.shape[1:2], -1)
        expected = NUMPY_AGGREGATORS[name](moved, -1)
    else:
        expected = NUMPY_AGGREGATORS[name](arr, dim)
    torch.testing.assert_close(out, torch.as_tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("order", [1, 2, 0.5, 3, INF, -INF, -1])
def test_get_aggregator_norms(order: float) -> None:
    t = randn(2, 4, 6)
    out = get_aggregator(order)(t, dim=1)
    arr = np.abs(t.numpy())
    if order == INF:
        expected = arr.max(axis=1)
    elif order == -INF:
        expected = arr.min(axis=1)
    else:
        expected = (arr**order).sum(axis=1) ** (1 / order)
    torch.testing.assert_close(out, torch.from_numpy(expected))
    torch.testing.assert_close(get_aggregator(order)(t), get_aggregator(order)(t.reshape(-1), 0))


def test_get_aggregator_explicit() -> None:
    t = torch.tensor([[1.0, 2.0, 4.0], [0.5, 0.5, 2.0]])
    torch.testing.assert_close(
        get_aggregator("fisher")(t, dim=1), torch.tensor([math.log(8), -math.log(2)])
    )
    torch.testing.assert_close(get_aggregator("geometric")(t, dim=1), torch.tensor([2.0, 0.7937]),
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    torch.testing.assert_close(get_aggregator("harmonic")(t, dim=1), torch.tensor([12 / 7, 2 / 3]))
    torch.testing.assert_close(get_aggregator("max")(t, dim=0), torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(get_aggregator(1)(t, dim=1), torch.tensor([7.0, 3.0]))


def test_get_aggregator_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="^'median' is not a valid AggrName"):
        get_aggregator("median")  # type: ignore[arg-type]

    class AggrWithNew(EnumWithExplicitSupport):
        FISHER = "fisher"
        GEOMETRIC = "geometric"
        HARMONIC = "harmonic"
        MAX = "max"
        MEAN = "mean"
        MIN = "min"
        PROD = "prod"
        SUM = "sum"
        NEW = "unexpected"

    monkeypatch.setattr(utils_module, "AggrName", AggrWithNew)
    with pytest.raises(ValueError, match="Unsupported aggregation"):
        get_aggregator("unexpected")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# batched_grad
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_grad(dtype: torch.dtype) -> None:
    x = randn(3, 5, 3, dtype=dtype).requires_grad_()
    w = randn(4, 3, 4, dtype=dtype)
    out = (x @ w).pow(2).sum(dim=1)  # one output per sample
    grad = batched_grad(out, x, retain_graph=True)
    assert grad.shape == x.shape
    expected = torch.stack([2 * w @ (xi @ w) for xi in x.detach()])  # per-sample, by hand
    torch.testing.assert_close(grad, expected, **tol(dtype))
    grad2 = batched_grad(out, x)  # graph retained by the first call
    torch.testing.assert_close(grad2, grad)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        batched_grad(out, x)


def test_batched_grad_several_inputs() -> None:
    x = torch.rand(4, 2, requires_grad=True)
    y = torch.rand(4, 2, requires_grad=True)
    gx, gy = batched_grad((x * y).sum(dim=1), (x, y))
    torch.testing.assert_close(gx, y.detach())
    torch.testing.assert_close(gy, x.detach())


# ---------------------------------------------------------------------------------------------
# fgm_direction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_fgm_direction_explicit(dtype: torch.dtype) -> None:
    g = torch.tensor([[1.0, 2.0]], dtype=dtype)
    s5 = math.sqrt(5)
    expected = torch.tensor([[1 / s5, 2 / s5]], dtype=dtype)
    torch.testing.assert_close(fgm_direction(g.clone(), p=2), expected, **tol(dtype))
    torch.testing.assert_close(fgm_direction(g.clone(), p=1), torch.tensor([[0.0, 1]], dtype=dtype))
    torch.testing.assert_close(fgm_direction(g.clone()), torch.tensor([[1.0, 1.0]], dtype=dtype))
    g = torch.tensor([[-1.0, 1.0]], dtype=dtype)
    torch.testing.assert_close(fgm_direction(g, p=1), torch.tensor([[-0.5, 0.5]], dtype=dtype))
    g = torch.tensor([[3.0, -3.0, 1.0], [0.0, 0.0, 0.0]], dtype=dtype)
    expected = torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(fgm_direction(g, p=1), expected)
    g = torch.tensor([[3.0, -4.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(fgm_direction(g, p=INF), torch.tensor([[1.0, -1, 0]], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 1.5, 2, 3, 7.5, INF])
def test_fgm_direction_holder_equality(p: float, dtype: torch.dtype) -> None:
    """<g, d> = ||g||_q with ||d||_p = 1: d attains the dual norm (Hölder's equality)."""
    g = randn(5, 4, 2, 3, dtype=dtype)
    g_copy = g.clone()
    d = fgm_direction(g, p=p)
    assert d.shape == g.shape
    assert d.dtype == dtype
    assert torch.equal(g, g_copy)  # no entry below eps: nothing zeroed
    g64, d64 = g.double().flatten(1).numpy(), d.double().flatten(1).numpy()
    q = 1.0 if p == INF else (INF if p == 1 else p / (p - 1))
    for gi, di in zip(g64, d64):
        p_norm = np.abs(di).max() if p == INF else (np.abs(di) ** p).sum() ** (1 / p)
        q_norm = np.abs(gi).max() if q == INF else (np.abs(gi) ** q).sum() ** (1 / q)
        assert p_norm == pytest.approx(1, rel=3e-3 if dtype == torch.float16 else 1e-5)
        assert gi @ di == pytest.approx(q_norm, rel=3e-3 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fgm_direction_zeroes_small_entries_in_place(dtype: torch.dtype) -> None:
    eps = torch.finfo(dtype).eps
    g = torch.tensor([[eps, -eps / 2, 1.0], [eps, 0.0, -eps]], dtype=dtype)
    d = fgm_direction(g, p=2)
    assert torch.equal(g, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=dtype))
    assert torch.equal(d, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=dtype))
    assert torch.equal(
        fgm_direction(torch.zeros(2, 3, dtype=dtype)), torch.zeros(2, 3, dtype=dtype)
    )


def test_fgm_direction_errors() -> None:
    for bad in (INF, -INF, NAN):
        g = torch.tensor([[1.0, bad]])
        with pytest.raises(ValueError, match="^Only finite gradients are allowed$"):
            fgm_direction(g)
        assert g[0, 0] == 1.0
    for p in (0.5, 0, -1, NAN):
        with pytest.raises(
            ValueError, match=re.escape(f"Parameter p must satisfy `p>=1` (got {p!r})")
        ):
            fgm_direction(torch.rand(2, 3), p=p)


def test_fgm_direction_check_option() -> None:
    # Two tied maxima and q = p / (p - 1) ~ 1e4: |g / ||g||_q| ** (q - 1) amplifies rounding
    g = torch.tensor([[1.0, 1.0, 0.5], [0.1, 0.2, 0.3]])
    p = 1.0001
    msg = (
        "This is likely due to computational approximations. Consider using p=1 if p is too "
        "close to 1"
    )
    with pytest.raises(AssertionError, match=f"{re.escape(msg)}$"):  # the reference's words
        fgm_direction(g.clone(), p=p)
    d = fgm_direction(g.clone(), p=p, check=False)
    assert d.shape == g.shape
    torch.testing.assert_close(
        d, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]), atol=0.01, rtol=0
    )
    torch.testing.assert_close(fgm_direction(g.clone(), p=1), d, atol=0.01, rtol=0)


# ---------------------------------------------------------------------------------------------
# torch_quantile
# ---------------------------------------------------------------------------------------------

INTERPOLATIONS = ("linear", "lower", "higher", "midpoint", "nearest")


def numpy_quantile_reference(
    t: Tensor, q: float, dim: int | None, keepdim: bool, interpolation: str
) -> np.ndarray:
    """torch.quantile's algorithm in numpy: ranks in the input dtype, CPU lerp formula."""
    np_dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[
        t.dtype
    ]
    opmath = np.float64 if t.dtype == torch.float64 else np.float32
    arr = t.numpy()
    if dim is None:
        arr_r, axis = arr.reshape(-1), 0
    else:
        arr_r, axis = (arr.reshape(1) if arr.ndim == 0 else arr), dim
    moved = np.moveaxis(arr_r, axis, -1)
    n = moved.shape[-1]
    rank = np_dtype(np_dtype(q) * np_dtype(n - 1))
    rank = {"lower": np.floor, "higher": np.ceil, "nearest": np.round}.get(
        interpolation, lambda r: r
    )(rank)
    below, above = int(np.floor(rank)), int(np.ceil(rank))
    sorted_ = np.sort(moved, axis=-1)
    lo = sorted_[..., below].astype(opmath)
    result = lo
    if interpolation in ("linear", "midpoint"):
        hi = sorted_[..., above].astype(opmath)
        w = opmath(0.5) if interpolation == "midpoint" else opmath(np_dtype(rank - below))
        result = lo + w * (hi - lo) if w < 0.5 else hi - (hi - lo) * (1 - w)
    result = np.where(np.isnan(moved).any(axis=-1), np.nan, result).astype(np_dtype)
    if arr.ndim == 0:
        result = result.reshape(())
    elif keepdim:
        result = result.reshape((1,) * arr.ndim) if dim is None else np.expand_dims(result, axis)
    return np.asarray(result)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=st.lists(st.integers(1, 7), min_size=0, max_size=3),
    q=st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.25, 1 / 3]), st.floats(0, 1)),
    dim_choice=st.integers(-4, 3),
    keepdim=st.booleans(),
    interpolation=st.sampled_from(INTERPOLATIONS),
    dtype=st.sampled_from(DTYPES),
    with_nan=st.booleans(),
)
def test_torch_quantile_matches_torch(
    seed: int,
    shape: list[int],
    q: float,
    dim_choice: int,
    keepdim: bool,
    interpolation: Any,
    dtype: torch.dtype,
    with_nan: bool,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(-5, 6, shape, generator=generator).double()  # duplicates on purpose
    t = t + torch.rand(shape, generator=generator, dtype=torch.float64).round(decimals=1)
    if with_nan and t.numel() > 1:
        t.view(-1)[seed % t.numel()] = NAN
    t = t.to(dtype)
    ndim = max(t.ndim, 1)
    dim = None if dim_choice < -ndim or dim_choice >= ndim else dim_choice
    out = torch_quantile(t, q, dim, keepdim=keepdim, interpolation=interpolation)
    assert out.dtype == dtype
    expected = numpy_quantile_reference(t, q, dim, keepdim, interpolation)
    assert tuple(out.shape) == expected.shape
    if interpolation in ("linear", "midpoint"):  # lerp: up to 1 ulp (fma, opmath)
        eps = float(torch.finfo(dtype).eps)
        np.testing.assert_allclose(out.numpy(), expected, rtol=eps, atol=eps)
    else:
        np.testing.assert_array_equal(out.numpy(), expected)
    if dtype != torch.float16:
        reference = torch.quantile(t, q, dim, keepdim=keepdim, interpolation=interpolation)
        torch.testing.assert_close(out, reference, equal_nan=True, atol=0, rtol=0)


def test_torch_quantile_defaults_and_large_input() -> None:
    t = torch.arange(10.0)
    assert torch_quantile(t, 0.25).item() == 2.0  # nearest: rank 2.25 -> 2
    assert torch_quantile(t, 0.25, interpolation="linear").item() == 2.25
    t = torch.rand(17_000_000, generator=torch.Generator().manual_seed(0))  # > torch's limit
    assert torch_quantile(t, 0.5).item() == pytest.approx(0.5, abs=1e-3)


def test_torch_quantile_errors() -> None:
    t = torch.rand(3)
    for q in (-0.1, 1.5):
        with pytest.raises(
            ValueError, match=re.escape(f"Only values 0<=q<=1 are supported (got {q!r})")
        ):
            torch_quantile(t, q)
    msg = (
        "Currently supported interpolations are {'linear', 'lower', 'higher', 'midpoint', "
        "'nearest'} (got 'cubic')"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        torch_quantile(t, 0.5, interpolation="cubic")  # type: ignore[arg-type]
    out = torch.empty(())
    with pytest.raises(
        ValueError, match=re.escape(f"Only None value is currently supported for out (got {out!r})")
    ):
        torch_quantile(t, 0.5, out=out)
    with pytest.raises(RuntimeError, match="non-empty"):
        torch_quantile(torch.empty(0), 0.5)


def test_torch_quantile_restores_deterministic_mode() -> None:
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch_quantile(torch.rand(4, 5), 0.3, 1, interpolation="linear")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


# ---------------------------------------------------------------------------------------------
# knn_label_count and ak_lpe
# ---------------------------------------------------------------------------------------------


def brute_force_neighbours(
    pop: Tensor, query: Tensor, k: int, metric: str, exclude_self: bool
) -> list[list[int]]:
    """Ids of the k nearest neighbours, by plain float64 loops (lower id first on ties)."""
    result = []
    for row, q in enumerate(query.double()):
        scored = []
        for i, x in enumerate(pop.double()):
            if exclude_self and i == row:
                continue
            key = float(((q - x) ** 2).sum()) if metric == "l2" else -float(q @ x)
            scored.append((key, i))
        result.append([i for _, i in sorted(scored)[:k]])
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("self_query", [False, True])
def test_knn_label_count(self_query: bool, metric: str, dtype: torch.dtype) -> None:
    pop = randn(0, 40, 5, dtype=dtype)
    labels = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(1))
    query = pop if self_query else randn(2, 12, 5, dtype=dtype)
    index = make_indexes(pop, metric=metric)
    counts = knn_label_count(index, labels, 5, 7, query, self_query=self_query)
    assert counts.dtype == torch.int64
    assert counts.shape == (len(query), 5)
    assert (counts.sum(dim=1) == 7).all()
    assert (counts[:, 4] == 0).all()
    if dtype == torch.float16:
        return  # near-ties in half precision; exactness checked in float32/64
    neighbours = brute_force_neighbours(pop, query, 7, metric, self_query)
    expected = torch.zeros(len(query), 5, dtype=torch.int64)
    for row, ids in enumerate(neighbours):
        for i in ids:
            expected[row, labels[i]] += 1
    assert torch.equal(counts, expected)


def test_knn_label_count_explicit_and_nan() -> None:
    pop = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    labels = torch.tensor([0, 1, 1, 2])
    index = make_indexes(pop, metric="l2")
    counts = knn_label_count(index, labels, 3, 2, torch.tensor([[0.2], [9.0]]))
    assert counts.tolist() == [[1, 1, 0], [0, 1, 1]]
    counts = knn_label_count(index, labels, 3, 3, pop, self_query=True)
    assert counts.tolist() == [[0, 2, 1], [1, 1, 1], [1, 1, 1], [1, 2, 0]]
    nan_counts = knn_label_count(index, labels, 3, 4, pop, self_query=True)
    assert nan_counts.shape == (4, 3)
    assert nan_counts.isnan().all()
    assert knn_label_count(index, labels, 3, 5, pop).isnan().all()
    # a NaN query has no neighbour (faiss fillers): nothing is counted
    counts = knn_label_count(index, labels, 3, 2, torch.tensor([[NAN], [0.0]]))
    assert counts.tolist() == [[0, 0, 0], [1, 1, 0]]


def test_knn_label_count_errors() -> None:
    index = make_indexes(torch.rand(5, 2), metric="l2")
    msg = "`labels` must have shape (index.ntotal,)=(5,) (got torch.Size([4]))"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        knn_label_count(index, torch.zeros(4, dtype=torch.int64), 2, 1, torch.rand(2, 2))
    labels = torch.tensor([0, 3, 1, 2, 0])
    msg = f"`labels` value out of range at: {(labels >= 3).nonzero()}"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        knn_label_count(index, labels, 3, 1, torch.rand(2, 2))


AK_POPULATION = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [0.5, 0.5]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("k", "metric", "expected"), [(1, "l2", 0.01), (2, "l2", 0.61), (1, "ip", 0.1)]
)
def test_ak_lpe_explicit(k: int, metric: str, expected: float, dtype: torch.dtype) -> None:
    index = make_indexes(AK_POPULATION.to(dtype), metric=metric)
    out = ak_lpe(index, k, torch.tensor([[0.1, 0.0]], dtype=dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out, torch.tensor([expected], dtype=dtype), **tol(dtype))


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("self_query", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_ak_lpe_against_loops(k: int, self_query: bool, metric: str) -> None:
    pop = randn(3, 30, 4)
    query = pop if self_query else randn(4, 9, 4)
    out = ak_lpe(make_indexes(pop, metric=metric), k, query, self_query=self_query)
    K = 3 * k // 2
    expected = []
    for row, q in enumerate(query):
        values = [
            float(((q - x) ** 2).sum()) if metric == "l2" else float(q @ x)
            for i, x in enumerate(pop)
            if not (self_query and i == row)
        ]
        values.sort(reverse=metric == "ip")
        expected.append(sum(values[K - k : K]) / k)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_ak_lpe_nan_when_population_too_small() -> None:
    index = make_indexes(AK_POPULATION, metric="l2")  # 5 samples
    query = torch.rand(3, 2)
    assert not ak_lpe(index, 3, query).isnan().any()  # K = 4
    assert ak_lpe(index, 3, AK_POPULATION, self_query=True).isfinite().all()  # 4 + 1 <= 5
    assert ak_lpe(index, 4, query).isnan().all()  # K = 6 > 5
    out = ak_lpe(index, 3, query.double(), self_query=False)
    assert out.dtype == torch.float64
    nan_out = ak_lpe(Index(dim=2, metric="ip"), 1, query.double())
    assert nan_out.shape == (3,)
    assert nan_out.dtype == torch.float64
    assert nan_out.isnan().all()


# ---------------------------------------------------------------------------------------------
# kldiv
# ---------------------------------------------------------------------------------------------


def test_kldiv_explicit() -> None:
    expected = torch.tensor([0, 1, 2, 3])
    out = kldiv(torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]]), expected)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([math.log(4 / 3) / 3, math.log(3)]))
    # q = 0 < p gives inf; identical distributions give 0
    assert kldiv(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0])).item() == INF
    # the reference's xlogy(p, p) - p·log q leaves at most a few ulps for identical inputs
    assert abs(kldiv(torch.tensor([2.0, 6.0]), torch.tensor([1.0, 3.0])).item()) < 1e-7


@pytest.mark.parametrize("dtype", DTYPES)
def test_kldiv_against_scipy(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    p = torch.rand(6, 5, generator=generator).to(dtype)
    q = torch.rand(5, generator=generator).to(dtype)
    p[0, 1] = 0  # 0 log 0
    out = kldiv(p, q)
    assert out.dtype == dtype
    assert out.shape == (6,)
    expected = scipy.stats.entropy(p.double().numpy(), q.double().numpy(), axis=1)
    torch.testing.assert_close(out.double(), torch.from_numpy(expected), **tol(dtype))


def test_kldiv_dtypes_and_broadcasting() -> None:
    ints = torch.tensor([[1, 2], [3, 4]])
    assert kldiv(ints, torch.tensor([1, 1])).dtype == torch.float32
    assert kldiv(ints, torch.tensor([1.0, 1.0], dtype=torch.float64)).dtype == torch.float64
    assert kldiv(ints.half(), torch.tensor([1, 1])).dtype == torch.float16
    out = kldiv(torch.tensor([1.0, 3.0]), torch.tensor([[1.0, 1.0], [1.0, 3.0]]))
    expected = [0.25 * math.log(0.5) + 0.75 * math.log(1.5), 0.0]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_kldiv_nan_rules_and_errors() -> None:
    expected = torch.tensor([1.0, 2.0, 3.0])
    inputs = torch.tensor([[1.0, 1.0, 1.0], [1.0, NAN, 1.0], [1.0, -1.0, 1.0], [0.0, 0, 1]])
    out = kldiv(inputs, expected)
    assert out[0].isfinite()
    assert out[1:3].isnan().all()
    assert out[3].isfinite()
    assert kldiv(inputs, torch.tensor([1.0, NAN, 3.0])).isnan().all()
    assert kldiv(inputs, torch.tensor([1.0, -2.0, 3.0])).isnan().all()
    with pytest.raises(
        ValueError, match=re.escape("`expected` must be at least a 1D tensor (got scalar)")
    ):
        kldiv(inputs, torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# dirmult_surprise and multinomial_test
# ---------------------------------------------------------------------------------------------


def scipy_dirmult_nll(counts: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    n = counts.sum(axis=-1)
    return -scipy.stats.dirichlet_multinomial.logpmf(counts, alpha, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dirmult_surprise_against_scipy(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.ones(4), 7 * 5, replacement=True, generator=generator)
    counts = torch.stack([torch.bincount(c, minlength=4) for c in counts.reshape(5, 7)])
    alpha = (torch.rand(4, generator=generator) * 3 + 0.2).to(dtype)
    out = dirmult_surprise(counts, alpha)
    assert out.dtype == dtype
    expected = np.array([scipy_dirmult_nll(c, alpha.double().numpy()) for c in counts.numpy()])
    torch.testing.assert_close(out.double(), torch.from_numpy(expected), **tol(dtype))
    # explicit formula with lgamma, by hand
    c, a = counts.double().numpy(), alpha.double().numpy()
    lg = scipy.special.gammaln
    by_hand = (
        lg(7 + a.sum()) - lg(8) - lg(a.sum()) + lg(a).sum() + lg(c + 1).sum(1) - lg(c + a).sum(1)
    )
    torch.testing.assert_close(out.double(), torch.from_numpy(by_hand), **tol(dtype))


def test_dirmult_surprise_scalar_alpha_and_errors() -> None:
    counts = torch.tensor([[2, 0, 1], [1, 1, 1]])
    out = dirmult_surprise(counts, 1.0)
    expected = [scipy_dirmult_nll(c, np.ones(3)) for c in counts.numpy()]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32))
    with pytest.raises(
        ValueError, match=re.escape("`counts` must be at least a 1D tensor (got scalar)")
    ):
        dirmult_surprise(torch.tensor(3), torch.ones(3))
    with pytest.raises(ValueError, match="^`counts` must have constant sum along last axis$"):
        dirmult_surprise(torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.ones(3))


@pytest.mark.parametrize("mode", ["mle", "map", "dcm"])
def test_multinomial_test(mode: str) -> None:
    counts = torch.tensor([[3, 1, 0], [2, 2, 0], [4, 0, 0]])  # reference counts (k = 4)
    prior = torch.tensor([1.0, 2.0, 1.5])
    test = multinomial_test(counts, prior, mode)
    obs = torch.tensor([[4, 0, 0], [0, 0, 4], [1, 2, 1]])
    out = test(obs)
    total = np.array([9.0, 3.0, 0.0])
    p = obs.double().numpy()
    if mode == "mle":
        assert out.dtype == torch.float32
        expected = [scipy.stats.entropy(row, total) for row in p]
    elif mode == "map":
        expected = [scipy.stats.entropy(row, total + prior.numpy() - 1) for row in p]
    else:
        expected = [scipy_dirmult_nll(row, total + prior.numpy()) for row in p]
    torch.testing.assert_close(out.double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    if mode == "mle":
        assert out[1].item() == INF  # an unseen class in the reference counts
    if mode == "map":  # S + prior - 1 < 0 somewhere: NaN everywhere
        assert multinomial_test(counts, 0.5, mode)(obs).isnan().all()


def test_multinomial_test_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ValueError, match=re.escape("`counts` must be at least a 1D tensor (got scalar)")
    ):
        multinomial_test(torch.tensor(2), 1.0, "mle")
    with pytest.raises(ValueError, match="^'compound' is not a valid MultinomialTestMode"):
        multinomial_test(torch.ones(2, 3), 1.0, "compound")  # type: ignore[arg-type]

    class ModeWithNew(EnumWithExplicitSupport):
        DCM = "dcm"
        MAP = "map"
        MLE = "mle"
        NEW = "unexpected"

    monkeypatch.setattr(stats_module, "MultinomialTestMode", ModeWithNew)
    with pytest.raises(ValueError, match="^Unsupported mode: 'unexpected'$"):
        multinomial_test(torch.ones(2, 3), 1.0, "unexpected")  # type: ignore[arg-type]
