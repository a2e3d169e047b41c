"""Exact reference behaviours: dtypes, order of computation and tie-breaking.

Each expected value is computed here, apart from the implementation, following the
reference's documented order of operations and dtypes step by step.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from scio.scores.utils import (
    Index,
    dirmult_surprise,
    fgm_direction,
    kldiv,
    knn_label_count,
    multinomial_test,
)


def _reference_order_dirmult(counts: Tensor, alpha: Tensor) -> Tensor:
    """lnΓ terms each in their argument's own dtype (integer → default float), constant first."""
    n = counts.sum(-1).flatten()[0]
    a = alpha.sum()
    lg = torch.special.gammaln
    constant = lg(n + a) - lg(n + 1) - lg(a) + lg(alpha).sum()
    res = constant + lg(counts + 1).sum(-1) - lg(counts + alpha).sum(-1)
    floating = counts.is_floating_point() or alpha.is_floating_point()
    return res.to(torch.result_type(counts, alpha) if floating else torch.float32)


def _float64_dirmult(counts: Tensor, alpha: Tensor) -> Tensor:
    """The same formula entirely in float64 (what scio computed before)."""
    c, a = counts.double(), alpha.double()
    lg = torch.lgamma
    n, big_a = c.sum(-1), a.sum()
    return (
        lg(n + big_a) - lg(n + 1) - lg(big_a) + lg(a).sum() + lg(c + 1).sum(-1) - lg(c + a).sum(-1)
    )


def _counts(seed: int, k: int = 50, n_classes: int = 10, rows: int = 40) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (rows, k), generator=generator)
    return torch.nn.functional.one_hot(labels, n_classes).sum(1)  # int64, rows sum to k


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_dirmult_surprise_follows_reference_dtypes(dtype: torch.dtype) -> None:
    counts = _counts(0)
    alpha = (counts[:30].sum(0) + torch.tensor(1.0)).to(dtype)  # S + prior, activations' dtype
    out = dirmult_surprise(counts, alpha)
    assert out.dtype == dtype
    expected = _reference_order_dirmult(counts, alpha)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # float64 inputs still carry float32 lnΓ(c + 1) terms, as in the reference: the result is
    # measurably not the all-float64 value (what distinguished scio from the reference).
    if dtype == torch.float64:
        gap = (out - _float64_dirmult(counts, alpha)).abs().max()
        assert 1e-7 < gap < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_multinomial_test_dcm_follows_reference(dtype: torch.dtype) -> None:
    reference, observed = _counts(1)[:25], _counts(2)
    prior = torch.tensor(1.0).to(dtype)
    test = multinomial_test(reference, prior, "dcm")
    expected = _reference_order_dirmult(observed, reference.sum(0) + prior)
    torch.testing.assert_close(test(observed), expected, rtol=0, atol=0)


def test_kldiv_integer_counts_normalised_in_default_float() -> None:
    """Integer counts are normalised in float32 before the cast, as in the reference."""
    observed = _counts(3)
    expected_counts = observed[:20].sum(0).double() + 0.3
    p = (observed / observed.sum(-1, keepdim=True)).double()  # float32 division, then cast
    q = expected_counts / expected_counts.sum()
    naive = (torch.xlogy(p, p) - p * q.log()).sum(-1)
    out = kldiv(observed, expected_counts)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive, rtol=0, atol=1e-15)


def test_knn_label_count_nan_result_is_default_float() -> None:
    index = Index(dim=2, metric="l2")
    index.add(torch.rand(3, 2, dtype=torch.float64))
    labels = torch.tensor([0, 1, 0])
    out = knn_label_count(
        index, labels, 2, 3, torch.rand(4, 2, dtype=torch.float64), self_query=True
    )
    assert out.dtype == torch.float32
    assert out.shape == (4, 2)
    assert out.isnan().all()


def test_knn_label_count_ties_lowest_id_like_reference_l2() -> None:
    """Equidistant neighbours: the lowest ids are kept (faiss' L2 heap keeps earlier ids)."""
    population = torch.tensor([[1.0], [-1.0], [1.0], [-1.0], [3.0]])
    labels = torch.tensor([0, 1, 2, 3, 4])
    index = Index(dim=1, metric="l2")
    index.add(population)
    counts = knn_label_count(index, labels, 5, 3, torch.zeros(1, 1))
    assert counts.tolist() == [[1, 1, 1, 0, 0]]
    faiss_index = Index(dim=1, metric="l2", backend="faiss")
    faiss_index.add(population)
    assert knn_label_count(faiss_index, labels, 5, 3, torch.zeros(1, 1)).tolist() == counts.tolist()


def test_fgm_direction_half_precision_check_trips() -> None:
    """In half precision the direction is computed in half, so the norm check can fail."""
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(8, 784, generator=generator)
    fgm_direction(grad.clone(), p=1.01)  # fine in float32
    with pytest.raises(AssertionError, match="Consider using p=1 if p is too close to 1"):
        fgm_direction(grad.half(), p=1.01)
    out = fgm_direction(grad.half(), p=1.01, check=False)
    assert out.dtype == torch.float16
    norms = torch.linalg.vector_norm(out.float(), ord=1.01, dim=1)
    assert (norms - 1).abs().max() > 4e-3  # beyond the half tolerance: the check was right


def test_knn_label_count_ip_ties_as_faiss_explicit() -> None:
    """Inner products [1, 0, 1, 1, 2, 1], k = 3: faiss keeps id 4 (value 2), then among the
    ids tied at 1 those met while fewer than 3 values >= 1 were seen (0, 2, 3), the highest
    ones: {2, 3}. The lowest-id rule would give {0, 2}."""
    population = torch.tensor([[1.0], [0.0], [1.0], [1.0], [2.0], [1.0]])
    index = Index(dim=1, metric="ip")
    index.add(population)
    counts = knn_label_count(index, torch.arange(6), 6, 3, torch.ones(1, 1))
    assert counts.tolist() == [[0, 0, 1, 1, 1, 0]]


def test_knn_label_count_ties_match_faiss_backend() -> None:
    """Heavily tied integer data (exact products): same counts as the reference's faiss."""
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(1)
    for _ in range(15):
        n = int(torch.randint(5, 60, (), generator=generator))
        d = int(torch.randint(1, 4, (), generator=generator))
        population = torch.randint(-2, 3, (n, d), generator=generator).float()
        queries = torch.cat(
            [population, torch.randint(-2, 3, (25, d), generator=generator).float()]
        )
        labels = torch.randint(0, 4, (n,), generator=generator)
        for metric in ("ip", "l2"):
            ours, ref = Index(dim=d, metric=metric), Index(dim=d, metric=metric, backend="faiss")
            ours.add(population)
            ref.add(population)
            for k in (1, 2, 4):
                if k + 1 > n:
                    continue
                own = knn_label_count(ours, labels, 4, k, population, self_query=True)
                expected = knn_label_count(ref, labels, 4, k, population, self_query=True)
                assert torch.equal(own, expected), (metric, k, "self")
                own = knn_label_count(ours, labels, 4, k, queries)
                assert torch.equal(own, knn_label_count(ref, labels, 4, k, queries)), (metric, k)
