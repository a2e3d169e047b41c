"""The tensor math of the export: exact nearest-neighbour search as a matrix product, the
ONNX-friendly forms of ``cdist``/``searchsorted``, and the comparison of outputs — each
against an independent naive computation."""

from __future__ import annotations

import math

import pytest
import torch

from scio.export import compare
from scio.export.routes import _cdist, _searchsorted
from scio.export.state import ExactSearch
from scio.index import Index

DTYPES = (torch.float32, torch.float64)


def _naive(queries: torch.Tensor, bank: torch.Tensor, k: int, ip: bool) -> torch.Tensor:
    """The ``k`` best distances of each query, by explicit loops over pairs (float64)."""
    rows = []
    for q in queries.double():
        if ip:
            values = sorted((float(q @ b) for b in bank.double()), reverse=True)
        else:
            values = sorted(float(((q - b) ** 2).sum()) for b in bank.double())
        filler = -3.4028234663852886e38 if ip else 3.4028234663852886e38
        rows.append((values + [filler] * k)[:k])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 3, 12])  # 12 > the 9 indexed samples: fillers
def test_exact_search_matches_the_index_and_a_naive_search(
    dtype: torch.dtype, metric: str, k: int
) -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(9, 5, generator=generator, dtype=dtype)
    bank[4] = bank[2]  # exactly tied neighbours
    queries = torch.randn(6, 5, generator=generator, dtype=dtype)
    index = Index(dim=5, metric=metric)
    index.add(bank)
    search = ExactSearch(index)
    D, I = search.search(queries, k)
    D_ref, I_ref = index.search(queries, k)
    assert torch.equal(D, D_ref)  # eager: the index's own algorithm
    assert torch.equal(I, I_ref)
    m = min(k, 9)
    D_exported, I_exported = search._product_search(queries.reshape(6, -1), k)
    naive = _naive(queries, bank, k, ip=metric == "ip")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(D_exported.double(), naive, atol=tol, rtol=tol)
    assert bool((I_exported[:, m:] == -1).all())
    chosen = bank[I_exported[:, :m]]  # the ids point at samples at the reported distance
    if metric == "ip":
        again = (chosen * queries[:, None]).sum(-1)
    else:
        again = (chosen - queries[:, None]).square().sum(-1)
    torch.testing.assert_close(again.double(), naive[:, :m], atol=tol, rtol=tol)


def test_exact_search_self_query_drops_the_query_itself() -> None:
    bank = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    index = Index(dim=3, metric="l2")
    index.add(bank)
    D, I = ExactSearch(index).search(bank, 2, self_query=True)
    D_ref, I_ref = index.search(bank, 2, self_query=True)
    assert torch.equal(D, D_ref)
    assert torch.equal(I, I_ref)
    assert not bool(I.eq(torch.arange(7)[:, None]).any())


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_cdist_by_differences(p: float) -> None:
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 4, generator=generator), torch.randn(3, 4, generator=generator)
    naive = torch.tensor([[float((x - y).abs().pow(p).sum() ** (1 / p)) for y in b] for x in a])
    torch.testing.assert_close(_cdist(a, b, p), naive, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("right", [False, True])
def test_searchsorted_by_counting(right: bool) -> None:
    seq = torch.tensor([[0.0, 1.0, 1.0, 2.0, 7.0], [-1.0, 0.5, 3.0, math.inf, math.inf]])
    values = torch.tensor([[1.0, -5.0, 2.5, math.nan], [0.5, math.inf, 9.0, -1.0]])
    naive = torch.tensor(  # entries below each value (NaN values: after everything)
        [
            [
                len(row) if math.isnan(v) else sum(s <= v if right else s < v for s in row)
                for v in vals.tolist()
            ]
            for row, vals in zip(seq.tolist(), values)
        ]
    )
    got = _searchsorted(seq, values, right=right)
    assert torch.equal(got, naive)
    assert torch.equal(got, torch.searchsorted(seq, values, right=right))
    flat = _searchsorted(seq[0], values, side="right" if right else "left", out_int32=True)
    assert flat.dtype == torch.int32
    assert torch.equal(flat.long(), torch.searchsorted(seq[0], values, right=right))


def test_compare_tolerances_and_non_finite_entries() -> None:
    expected = (torch.tensor([1.0, 100.0, math.inf, math.nan]), torch.tensor([[0.0, -2.0]]))
    close = (torch.tensor([1.00005, 100.009, math.inf, math.nan]), torch.tensor([[5e-5, -2.0]]))
    difference = compare(close, expected, atol=1e-4, rtol=1e-4)
    assert difference.ok
    assert difference.mismatched == 0
    assert difference.max_abs == pytest.approx(0.009, rel=1e-3)
    assert difference.max_rel == pytest.approx(9e-5, rel=1e-3)  # where rtol|b| >= atol
    far = (torch.tensor([1.0, 100.02, -math.inf, 0.0]), expected[1])
    bad = compare(far, expected, atol=1e-4, rtol=1e-4)
    assert not bad.ok
    assert bad.mismatched == 2  # -inf vs inf, 0 vs NaN
    assert "largest difference" in str(bad)
    with pytest.raises(ValueError, match="shapes differ"):
        compare((torch.zeros(2),), (torch.zeros(3),))
