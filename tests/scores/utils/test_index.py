"""``scio.scores.utils.Index`` / ``make_indexes`` against an independent brute-force reference."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import scio.index.flat as flat_module
import scio.index.index as index_module
from scio.index.index import IndexType, TorchIndexFlatIP, TorchIndexFlatL2
from scio.scores.utils import Index, make_indexes
from scio.utils.enums import EnumWithExplicitSupport

FLT_MAX = 3.4028234663852886e38
DTYPES = (torch.float16, torch.float32, torch.float64)
METRICS = ("l2", "ip")
try:
    import faiss  # noqa: F401

    HAS_FAISS = True
except ImportError:
    HAS_FAISS = False
needs_faiss = pytest.mark.skipif(
    not HAS_FAISS, reason="faiss is not installed (optional extra: pip install scio[faiss])"
)
BACKENDS = ("torch", pytest.param("faiss", marks=needs_faiss))


# ---------------------------------------------------------------------------------------------
# Reference implementation: plain float64 Python loops
# ---------------------------------------------------------------------------------------------


def reference_search(
    population: Tensor, queries: Tensor, k: int, metric: str, *, self_query: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN in float64 (explicit differences / products), ties broken by lower id,
    faiss fillers, then the self-exclusion rule applied row by row."""
    pop = population.double().flatten(1).numpy()
    qs = queries.double().flatten(1).numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        if metric == "l2":
            values = ((qs[:, None, :] - pop[None, :, :]) ** 2).sum(axis=2)
            keys = values
        else:
            values = (qs[:, None, :] * pop[None, :, :]).sum(axis=2)
            keys = -values
    filler = -FLT_MAX if metric == "ip" else FLT_MAX
    kk = k + self_query
    all_D, all_I = [], []
    for row in range(len(qs)):
        # NaN and values not better than the filler are never neighbours
        candidates = [(keys[row, i], i) for i in range(len(pop)) if keys[row, i] < FLT_MAX]
        candidates.sort()
        I = [i for _, i in candidates[:kk]]
        D = [float(values[row, i]) for i in I]
        D += [filler] * (kk - len(I))
        I += [-1] * (kk - len(I))
        if self_query:
            drop = I.index(row) if row in I[:k] else k
            del D[drop], I[drop]
        all_D.append(D)
        all_I.append(I)
    return (
        np.array(all_D, dtype=np.float64).reshape(len(qs), k),
        np.array(all_I, dtype=np.int64).reshape(len(qs), k),
    )


def true_values(population: Tensor, queries: Tensor, I: np.ndarray, metric: str) -> np.ndarray:
    """Reference distance / similarity of each returned neighbour (NaN for fillers)."""
    pop = population.double().flatten(1).numpy()
    qs = queries.double().flatten(1).numpy()
    out = np.full(I.shape, np.nan)
    for r, c in zip(*np.nonzero(I >= 0)):
        x, q = pop[I[r, c]], qs[r]
        out[r, c] = ((q - x) ** 2).sum() if metric == "l2" else q @ x
    return out


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float16: {"atol": 2e-2, "rtol": 2e-2},
        torch.float32: {"atol": 1e-4, "rtol": 1e-4},
        torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    }[dtype]


def assert_matches_reference(
    D: Tensor,
    I: Tensor,
    population: Tensor,
    queries: Tensor,
    k: int,
    metric: str,
    *,
    self_query: bool = False,
    exact: bool = False,
    tol_dtype: torch.dtype | None = None,
) -> None:
    """``exact``: same ids and values. Otherwise ids may differ only between near-ties.

    ``tol_dtype``: precision of the computation (default: ``D.dtype``).
    """
    ref_D, ref_I = reference_search(population, queries, k, metric, self_query=self_query)
    assert D.shape == I.shape == ref_D.shape
    assert I.dtype == torch.int64
    got_D = D.double().numpy()
    got_I = I.numpy()
    np.testing.assert_array_equal(got_I == -1, ref_I == -1)
    filler = -FLT_MAX if metric == "ip" else FLT_MAX
    expected_filler = float(torch.tensor(filler, dtype=D.dtype))
    assert (got_D[got_I == -1] == expected_filler).all()
    valid = ref_I >= 0
    ref_cast = torch.from_numpy(ref_D).to(D.dtype).double().numpy()  # values as seen in dtype
    if exact:
        np.testing.assert_array_equal(got_I, ref_I)
        np.testing.assert_array_equal(got_D[valid], ref_cast[valid])
        return
    tol = tolerance(tol_dtype or D.dtype)
    np.testing.assert_allclose(got_D[valid], ref_cast[valid], **tol)
    # every returned id is a genuine neighbour with the reported value
    np.testing.assert_allclose(
        true_values(population, queries, got_I, metric)[valid], got_D[valid], **tol
    )
    # each row holds distinct ids; ids match the reference wherever there is no near-tie
    for row in range(len(got_I)):
        ids = got_I[row][got_I[row] >= 0]
        assert len(set(ids.tolist())) == len(ids)
    gaps = np.abs(np.diff(ref_D, axis=1))
    scale = tol["atol"] + tol["rtol"] * np.abs(ref_D)
    isolated = np.ones_like(valid)
    isolated[:, 1:] &= gaps > 2 * scale[:, 1:]
    isolated[:, :-1] &= gaps > 2 * scale[:, :-1]
    mask = valid & isolated
    np.testing.assert_array_equal(got_I[mask], ref_I[mask])


def random_data(
    seed: int, n: int, d: int, *, integer: bool = False, dtype: torch.dtype = torch.float32
) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    if integer:
        return torch.randint(-2, 3, (n, d), generator=generator).to(dtype)
    return torch.randn(n, d, generator=generator).to(dtype)


# ---------------------------------------------------------------------------------------------
# Construction, properties, validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_properties(metric: str, backend: Any) -> None:
    index = Index(dim=3, metric=metric, backend=backend)
    assert index.dim == 3
    assert index.metric == metric
    assert index.backend == backend
    assert index.ntotal == 0
    assert index.D_is_similarity is (metric == "ip")
    index.add(torch.rand(4, 3))
    index.add(torch.rand(2, 1, 3))  # flattened to (n, -1)
    assert index.ntotal == 6
    assert repr(index) == f"Index(dim=3, metric='{metric}', ntotal=6, backend='{backend}')"


def test_metric_kept_as_given() -> None:
    from scio.utils.enums import IndexMetric

    index = Index(dim=2, metric=IndexMetric.IP)
    assert index.metric is IndexMetric.IP
    assert index.D_is_similarity


def test_invalid_metric_and_backend() -> None:
    with pytest.raises(ValueError, match="'cosine' is not a valid IndexMetric"):
        Index(dim=2, metric="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unsupported index backend: 'annoy'"):
        Index(dim=2, metric="l2", backend="annoy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`dim` must be a non-negative integer"):
        Index(dim=-1, metric="l2")


class _MetricWithNew(EnumWithExplicitSupport):
    IP = "ip"
    L2 = "l2"
    NEW = "unexpected"


def test_unsupported_metric_member(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "IndexMetric", _MetricWithNew)
    with pytest.raises(NotImplementedError, match="^Unsupported metric: 'unexpected'$"):
        IndexType("unexpected")  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="Unsupported metric"):
        Index(dim=2, metric="unexpected")  # type: ignore[arg-type]


def test_index_type() -> None:
    assert IndexType("l2") is TorchIndexFlatL2
    assert IndexType("ip") is TorchIndexFlatIP


@needs_faiss
def test_index_type_faiss() -> None:
    import faiss

    assert IndexType("l2", backend="faiss") is faiss.IndexFlatL2
    assert IndexType("ip", backend="faiss") is faiss.IndexFlatIP
    index = Index(dim=3, metric="ip", backend="faiss")
    assert isinstance(index.faiss, faiss.IndexFlatIP)


def test_missing_faiss_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = index_module.importlib.import_module

    def fake_import(name: str, *args: Any) -> Any:
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args)

    monkeypatch.setattr(index_module.importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match=r"pip install scio\[faiss\]"):
        Index(dim=2, metric="l2", backend="faiss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dimension_errors(backend: Any) -> None:
    index = Index(dim=4, metric="l2", backend=backend)
    with pytest.raises(ValueError, match=r"Expected samples of flattened dimension 4 \(got 6"):
        index.add(torch.rand(3, 2, 3))
    index.add(torch.rand(3, 2, 2))
    with pytest.raises(ValueError, match=r"Expected samples of flattened dimension 4 \(got 3"):
        index.search(torch.rand(2, 3), 1)
    with pytest.raises(ValueError, match="got scalar"):
        index.search(torch.tensor(1.0), 1)
    with pytest.raises(ValueError, match="`k` must be a non-negative integer"):
        index.search(torch.rand(2, 4), -1)


# ---------------------------------------------------------------------------------------------
# Search semantics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_explicit_search(metric: str, dtype: torch.dtype, backend: Any) -> None:
    population = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [0.5, 0.5]], dtype=dtype)
    query = torch.tensor([[0.1, 0.0]], dtype=dtype)
    index = make_indexes(population, metric=metric, backend=backend)
    D, I = index.search(query, 7)
    assert D.dtype == dtype
    filler = float(torch.tensor(FLT_MAX, dtype=dtype))
    if metric == "l2":
        expected_D = [0.01, 0.41, 0.81, 1.01, 1.81, filler, filler]
        assert I.tolist() == [[0, 4, 2, 1, 3, -1, -1]]
    else:
        expected_D = [0.1, 0.1, 0.05, 0.0, 0.0, -filler, -filler]
        assert sorted(I[0, :2].tolist()) == [2, 3]
        assert I[0, 2] == 4
        assert sorted(I[0, 3:5].tolist()) == [0, 1]
        assert I[0, 5:].tolist() == [-1, -1]
        if backend == "torch":  # ties: lower id first
            assert I.tolist() == [[2, 3, 4, 0, 1, -1, -1]]
    tol_dtype = torch.float32 if backend == "faiss" and dtype == torch.float64 else dtype
    torch.testing.assert_close(D, torch.tensor([expected_D], dtype=dtype), **tolerance(tol_dtype))
    if dtype == torch.float16:
        assert D[0, -1].item() == (-math.inf if metric == "ip" else math.inf)
    else:
        assert abs(D[0, -1].item()) == pytest.approx(FLT_MAX)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_output_dtype_and_device(metric: str, backend: Any) -> None:
    index = make_indexes(torch.rand(5, 3), metric=metric, backend=backend)
    for dtype in DTYPES:
        D, I = index.search(torch.rand(4, 3).to(dtype), 6)
        assert D.dtype == dtype
        assert I.dtype == torch.int64
        assert D.shape == I.shape == (4, 6)
        assert D.device == I.device == torch.device("cpu")
    D, I = index.search(torch.randint(0, 3, (2, 3)), 2)  # non-float queries: float32 D
    assert D.dtype == torch.float32
    D, I = index.search(torch.rand(0, 3), 3)
    assert D.shape == I.shape == (0, 3)
    D, I = index.search(torch.rand(2, 3), 0)
    assert D.shape == I.shape == (2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_empty_index(metric: str, backend: Any) -> None:
    index = Index(dim=2, metric=metric, backend=backend)
    D, I = index.search(torch.rand(3, 2, dtype=torch.float64), 2)
    assert (I == -1).all()
    filler = -FLT_MAX if metric == "ip" else FLT_MAX
    assert D.eq(filler).all()
    assert D.dtype == torch.float64


@pytest.mark.parametrize("metric", METRICS)
def test_trivial_self_nearest(metric: str) -> None:
    population = random_data(0, 50, 8, dtype=torch.float64)
    if metric == "ip":
        population = population / population.norm(dim=1, keepdim=True)
    D, I = make_indexes(population, metric=metric).search(population, 1)
    assert I[:, 0].tolist() == list(range(50))
    expected = 0.0 if metric == "l2" else 1.0
    torch.testing.assert_close(D[:, 0], torch.full((50,), expected, dtype=torch.float64))


def test_caller_tensors_untouched() -> None:
    population = torch.rand(6, 3)
    query = torch.rand(2, 3)
    population_copy, query_copy = population.clone(), query.clone()
    index = make_indexes(population, metric="l2")
    D_before, I_before = index.search(query, 3)
    assert torch.equal(population, population_copy)
    assert torch.equal(query, query_copy)
    population.add_(100.0)  # the index holds its own copy
    D_after, I_after = index.search(query, 3)
    assert torch.equal(D_before, D_after)
    assert torch.equal(I_before, I_after)


def test_no_autograd_graph() -> None:
    population = torch.rand(5, 3, requires_grad=True)
    query = torch.rand(2, 3, requires_grad=True)
    index = make_indexes(population, metric="l2")
    D, _ = index.search(query, 2)
    assert not D.requires_grad


@pytest.mark.parametrize("metric", METRICS)
def test_nan_and_inf_are_never_neighbours(metric: str) -> None:
    population = torch.tensor([[0.0, 0.0], [math.nan, 1.0], [1.0, 1.0], [math.inf, 0.0]])
    index = make_indexes(population, metric=metric)
    D, I = index.search(torch.tensor([[0.5, 0.5], [math.nan, 0.0]]), 4)
    if metric == "l2":
        assert sorted(I[0, :2].tolist()) == [0, 2]
        assert I[0, 2:].tolist() == [-1, -1]
    else:  # inner products inf (a valid value), 1, 0 then the NaN one is dropped
        assert I[0].tolist() == [3, 2, 0, -1]
        assert D[0, 0].item() == math.inf
    assert (I[1] == -1).all()  # NaN query: only fillers, like faiss
    assert_matches_reference(
        D, I, population, torch.tensor([[0.5, 0.5], [math.nan, 0.0]]), 4, metric
    )


# ---------------------------------------------------------------------------------------------
# Agreement with the brute-force reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("self_query", [False, True])
@pytest.mark.parametrize(
    ("n", "nq", "d", "k"),
    [(1, 3, 2, 1), (7, 5, 3, 7), (7, 5, 3, 9), (30, 12, 5, 4), (300, 80, 48, 10)],
)
def test_random_against_reference(
    n: int, nq: int, d: int, k: int, self_query: bool, metric: str, dtype: torch.dtype
) -> None:
    population = random_data(n + d, n, d, dtype=dtype)
    queries = population if self_query else random_data(nq, nq, d, dtype=dtype)
    index = make_indexes(population, metric=metric)
    D, I = index.search(queries, k, self_query=self_query)
    assert D.dtype == dtype
    assert_matches_reference(D, I, population, queries, k, metric, self_query=self_query)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_matmul_path_against_reference(metric: str, dtype: torch.dtype) -> None:
    """Population split in several tiles (partial top-k merged) and the GEMM L2 formula."""
    population = random_data(1, 700, 40, dtype=dtype)
    queries = random_data(2, 90, 40, dtype=dtype)
    index = Index(dim=40, metric=metric, max_block_bytes=4 * 90 * 64)
    index.add(population)
    D, I = index.search(queries, 12)
    assert_matches_reference(D, I, population, queries, 12, metric)
    D, I = index.search(population[:90], 5, self_query=True)
    assert_matches_reference(D, I, population, population[:90], 5, metric, self_query=True)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(0, 25),
    nq=st.integers(0, 8),
    d=st.integers(1, 4),
    extra_k=st.integers(-3, 3),
    metric=st.sampled_from(METRICS),
    dtype=st.sampled_from(DTYPES),
    self_query=st.booleans(),
    tiny_blocks=st.booleans(),
    gemm=st.booleans(),
)
def test_exact_ties_against_reference(
    seed: int,
    n: int,
    nq: int,
    d: int,
    extra_k: int,
    metric: str,
    dtype: torch.dtype,
    self_query: bool,
    tiny_blocks: bool,
    gemm: bool,
) -> None:
    """Small-integer data: every distance is exact and ties abound; ids must match exactly
    (lower id first), whatever the tiling and the L2 formula."""
    population = random_data(seed, n, d, integer=True, dtype=dtype)
    queries = population if self_query else random_data(seed + 1, nq, d, integer=True, dtype=dtype)
    k = max(0, n + extra_k)
    index = Index(dim=d, metric=metric, max_block_bytes=16 if tiny_blocks else 2**28)
    index.add(population)
    old = flat_module._DIRECT_L2_MAX_ELEMENTS
    flat_module._DIRECT_L2_MAX_ELEMENTS = -1 if gemm else old
    try:
        D, I = index.search(queries, k, self_query=self_query)
    finally:
        flat_module._DIRECT_L2_MAX_ELEMENTS = old
    assert_matches_reference(
        D, I, population, queries, k, metric, self_query=self_query, exact=True
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l2_cancellation_never_negative(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large norms and tiny distances: the GEMM formula is clamped at 0 (float32: values are
    cancellation noise, like faiss); in float64 duplicates of the query are tied at exactly the
    same value and come lower id first."""
    monkeypatch.setattr(flat_module, "_DIRECT_L2_MAX_ELEMENTS", -1)
    base = 1000 + random_data(0, 1, 16, dtype=dtype)
    population = torch.cat([base + 1e-4 * random_data(1, 20, 16, dtype=dtype), base, base])
    queries = torch.cat([base, population[:5]])
    D, I = make_indexes(population, metric="l2").search(queries, 4)
    assert (D >= 0).all()
    noise = 16 * torch.finfo(dtype).eps * float(base.square().sum())
    assert D.le(noise + 1e-6).all()
    if dtype == torch.float64:
        assert I[0, :2].tolist() == [20, 21]
        assert D[0, 0] == D[0, 1] == 0
        for row in range(1, 6):
            assert row - 1 in I[row].tolist()


def test_tie_order_lower_id_first() -> None:
    population = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    for metric in METRICS:
        D, I = make_indexes(population, metric=metric).search(torch.tensor([[1.0, 0.0]]), 2)
        assert I.tolist() == [[0, 2]]
        assert D.tolist() == [[0.0, 0.0]] if metric == "l2" else [[1.0, 1.0]]
        _, I = make_indexes(population, metric=metric).search(torch.tensor([[1.0, 0.0]]), 5)
        assert I[0, :3].tolist() == [0, 2, 4]


# ---------------------------------------------------------------------------------------------
# self_query and remove_ids
# ---------------------------------------------------------------------------------------------


def test_self_query_explicit() -> None:
    population = torch.tensor([[0.0], [1.0], [3.0], [3.0], [7.0]])
    index = make_indexes(population, metric="l2")
    D, I = index.search(population, 2, self_query=True)
    # row 2 and row 3 are duplicates: each one's nearest other point is the other one
    assert I.tolist() == [[1, 2], [0, 2], [3, 1], [2, 1], [2, 3]]
    assert D.tolist() == [[1.0, 9.0], [1.0, 4.0], [0.0, 4.0], [0.0, 4.0], [16.0, 16.0]]
    # k beyond the population: self dropped, fillers at the end
    D, I = index.search(population, 5, self_query=True)
    assert I[:, -1].tolist() == [-1] * 5
    for row in range(5):
        assert row not in I[row].tolist()


def test_self_query_when_self_is_not_first() -> None:
    """Duplicates of a query with lower ids come first: self is dropped only if among the
    first k, otherwise the (k+1)-th column is dropped."""
    population = torch.tensor([[0.0], [0.0], [0.0], [5.0]])
    D, I = make_indexes(population, metric="l2").search(population, 1, self_query=True)
    assert I[:, 0].tolist() == [1, 0, 0, 0]
    assert D[:, 0].tolist() == [0.0, 0.0, 0.0, 25.0]
    _, I = make_indexes(population, metric="l2").search(population, 2, self_query=True)
    assert I.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_remove_ids(seed: int, metric: str, backend: Any) -> None:
    population = random_data(seed, 40, 6)
    index = make_indexes(population, metric=metric, backend=backend)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randperm(40, generator=generator)[:15]
    n_removed = index.remove_ids(torch.cat([ids, ids[:3], torch.tensor([40, 1000])]))
    assert n_removed == 15
    assert index.ntotal == 25
    keep = torch.ones(40, dtype=torch.bool)
    keep[ids] = False
    remaining = population[keep]  # positions shift down, order kept
    queries = random_data(seed + 10, 9, 6)
    D, I = index.search(queries, 30)
    assert_matches_reference(D, I, remaining, queries, 30, metric)
    assert index.remove_ids([0, 0]) == 1
    assert index.remove_ids(np.array([], dtype=np.int64)) == 0
    D, I = index.search(remaining[1:], 3, self_query=True)
    assert_matches_reference(D, I, remaining[1:], remaining[1:], 3, metric, self_query=True)


def test_remove_ids_on_empty_index() -> None:
    assert Index(dim=2, metric="l2").remove_ids([0, 1]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_dtypes_and_incremental_add(dtype: torch.dtype) -> None:
    """The population keeps the dtype of the first added samples (later adds are cast) and is
    searched in float32 (float64 if it is float64); D has the queries' dtype."""
    first, second = random_data(0, 10, 4, dtype=dtype), random_data(1, 10, 4)
    index = Index(dim=4, metric="l2")
    index.add(first)
    index.add(second)
    assert index._torch is not None
    assert index._torch.data is not None
    assert index._torch.data.dtype == dtype
    population = torch.cat([first, second.to(dtype)])
    queries = random_data(2, 5, 4, dtype=torch.float64)
    D, I = index.search(queries, 20)
    assert D.dtype == torch.float64
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    ref_D, ref_I = reference_search(population, queries.to(compute), 20, "l2")
    torch.testing.assert_close(D, torch.from_numpy(ref_D), **tolerance(compute))
    assert torch.equal(I, torch.from_numpy(ref_I))


# ---------------------------------------------------------------------------------------------
# faiss backend: same results
# ---------------------------------------------------------------------------------------------


@needs_faiss
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "nq", "d", "k"), [(5, 3, 2, 8), (200, 40, 16, 10), (60, 60, 8, 5)])
def test_faiss_agreement(n: int, nq: int, d: int, k: int, metric: str, dtype: torch.dtype) -> None:
    population = random_data(n, n, d, dtype=dtype)
    queries = random_data(nq, nq, d, dtype=dtype)
    results = {}
    for backend in ("torch", "faiss"):
        index = make_indexes(population, metric=metric, backend=backend)  # type: ignore[call-overload]
        results[backend] = (index.search(queries, k), index.search(population, 3, self_query=True))
        removed = index.remove_ids(torch.arange(0, n, 3))
        results[backend + "_removed"] = (removed, index.ntotal, index.search(queries, k))
    (D_t, I_t), (Ds_t, Is_t) = results["torch"]
    (D_f, I_f), (Ds_f, Is_f) = results["faiss"]
    assert D_t.dtype == D_f.dtype == dtype
    f32 = torch.float32 if dtype == torch.float64 else dtype  # faiss computes in float32
    tol = tolerance(f32)
    torch.testing.assert_close(D_t, D_f, **tol)
    torch.testing.assert_close(Ds_t, Ds_f, **tol)
    assert_matches_reference(D_f, I_f, population, queries, k, metric, tol_dtype=f32)
    assert_matches_reference(D_t, I_t, population, queries, k, metric)
    assert_matches_reference(
        Ds_f, Is_f, population, population, 3, metric, self_query=True, tol_dtype=f32
    )
    if dtype != torch.float16:  # continuous data: no near-ties at this precision
        assert torch.equal(I_t, I_f)
        assert torch.equal(Is_t, Is_f)
    removed_t, ntotal_t, (Dr_t, Ir_t) = results["torch_removed"]
    removed_f, ntotal_f, (Dr_f, Ir_f) = results["faiss_removed"]
    assert (removed_t, ntotal_t) == (removed_f, ntotal_f)
    torch.testing.assert_close(Dr_t, Dr_f, **tol)
    if dtype != torch.float16:
        assert torch.equal(Ir_t, Ir_f)


@needs_faiss
@pytest.mark.parametrize("metric", METRICS)
def test_faiss_agreement_l2_ties(metric: str) -> None:
    """faiss also returns lower ids first for tied L2 distances (not always for IP)."""
    population = random_data(3, 30, 3, integer=True)
    queries = random_data(4, 25, 3, integer=True)
    D_t, I_t = make_indexes(population, metric=metric).search(queries, 6)
    D_f, I_f = make_indexes(population, metric=metric, backend="faiss").search(queries, 6)
    assert torch.equal(D_t, D_f)
    if metric == "l2":
        assert torch.equal(I_t, I_f)


# ---------------------------------------------------------------------------------------------
# make_indexes
# ---------------------------------------------------------------------------------------------


def structure(nest: Any) -> Any:
    """Replace every Index by its ntotal, keeping the tuple nesting."""
    if isinstance(nest, Index):
        return nest.ntotal
    assert isinstance(nest, tuple)
    return tuple(structure(x) for x in nest)


@pytest.mark.parametrize("squeeze", [True, False])
@pytest.mark.parametrize("groups_kind", ["none", "tensor", "tuple"])
@pytest.mark.parametrize("samples_kind", ["tensor", "tuple"])
def test_make_indexes_nesting(samples_kind: str, groups_kind: str, squeeze: bool) -> None:
    acts = (torch.rand(6, 2, 2), torch.rand(6, 3))
    labels = (torch.tensor([0, 1, 0, 2, 0, 1]), torch.tensor([2, 2, 2, 2, 0, 0]))
    n_groups = 4  # group 3 is empty for both label tensors
    all_samples = acts[0] if samples_kind == "tensor" else acts
    samples_list = [acts[0]] if samples_kind == "tensor" else list(acts)
    if groups_kind == "none":
        all_groups: Any = None
        groups_list: list[Tensor | None] = [None]
    elif groups_kind == "tensor":
        all_groups, groups_list = labels[0], [labels[0]]
    else:
        all_groups, groups_list = labels, list(labels)

    result = make_indexes(
        all_samples,
        all_groups,
        n_groups=None if groups_kind == "none" else n_groups,
        metric="l2",
        squeeze=squeeze,
    )

    def counts(groups: Tensor | None) -> tuple[int, ...]:
        if groups is None:
            return (6,)
        return tuple(int((groups == g).sum()) for g in range(n_groups))

    expected: Any = tuple(tuple(counts(g) for _ in samples_list) for g in groups_list)
    if squeeze:
        if groups_kind == "none":
            expected = tuple(tuple(v[0] for v in per_g) for per_g in expected)
        if samples_kind == "tensor":
            expected = tuple(per_g[0] for per_g in expected)
        if groups_kind != "tuple":
            expected = expected[0]
    assert structure(result) == expected


def test_make_indexes_group_contents_and_order() -> None:
    samples = torch.arange(12.0).reshape(6, 2)
    groups = torch.tensor([1, 0, 1, 5, -1, 1])  # 5 and -1 are outside range(n_groups)
    indexes = make_indexes(samples, groups, n_groups=3, metric="l2")
    assert [index.ntotal for index in indexes] == [1, 3, 0]
    # group 1 holds samples 0, 2, 5 in this order
    D, I = indexes[1].search(samples[[0, 2, 5]], 1)
    assert I[:, 0].tolist() == [0, 1, 2]
    assert D.abs().max() == 0
    empty = indexes[2]
    assert empty.dim == 2
    D, I = empty.search(samples, 2)
    assert (I == -1).all()
    # float group values work too
    float_indexes = make_indexes(samples, groups.double(), n_groups=3, metric="ip")
    assert [index.ntotal for index in float_indexes] == [1, 3, 0]
    assert all(index.metric == "ip" for index in float_indexes)


def test_make_indexes_single_index_typical() -> None:
    acts = torch.rand(10, 3, 2, 2)
    index = make_indexes(acts, metric="l2")
    assert isinstance(index, Index)
    assert (index.dim, index.ntotal) == (12, 10)
    indexes = make_indexes((acts, acts[:, 0]), metric="ip")
    assert isinstance(indexes, tuple)
    assert [(i.dim, i.ntotal) for i in indexes] == [(12, 10), (4, 10)]


@pytest.mark.parametrize("n_groups", [None, 0, -2, 2.0, True])
def test_make_indexes_n_groups_error(n_groups: Any) -> None:
    msg = f"Since `all_groups is not None`, `n_groups` must be a positive integer (got {n_groups})"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        make_indexes(torch.rand(3, 2), torch.tensor([0, 1, 0]), n_groups=n_groups, metric="l2")


def test_make_indexes_groups_length_mismatch() -> None:
    with pytest.raises(ValueError, match="one value per sample"):
        make_indexes(torch.rand(3, 2), torch.tensor([0, 1]), n_groups=2, metric="l2")


@needs_faiss
def test_make_indexes_faiss_backend() -> None:
    indexes = make_indexes(
        torch.rand(5, 2), torch.tensor([0, 1, 0, 1, 1]), n_groups=3, metric="l2", backend="faiss"
    )
    assert [index.ntotal for index in indexes] == [2, 3, 0]
    assert all(index.backend == "faiss" for index in indexes)


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("metric", METRICS)
def test_cuda_population_and_queries(metric: str) -> None:
    population = random_data(0, 300, 16)
    queries = random_data(1, 50, 16)
    index = make_indexes(population.cuda(), metric=metric)
    D, I = index.search(queries.cuda(), 7)
    assert D.device.type == I.device.type == "cuda"
    assert_matches_reference(D.cpu(), I.cpu(), population, queries, 7, metric)
    D_cpu, I_cpu = index.search(queries, 7)  # CPU queries against a CUDA population
    assert D_cpu.device.type == I_cpu.device.type == "cpu"
    torch.testing.assert_close(D_cpu, D.cpu())
