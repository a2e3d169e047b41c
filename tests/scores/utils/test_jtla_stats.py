"""JTLA's test statistics and joint p-values against per-class and loop computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from scio.scores.utils import jtla_stats, multinomial_test
from scio.scores.utils.jtla_stats import layer_subsets, multinomial_tests, subset_pvalues
from scio.utils.enums import MultinomialTestMode

N_CLASSES = 3
INF = math.inf


def _counts(generator: torch.Generator, n: int) -> Tensor:
    """``(n, C)`` float64 label counts summing to 6 per row."""
    obs = torch.randint(0, 5, (n, N_CLASSES), generator=generator).double()
    obs[:, -1] = 6 - obs[:, :-1].sum(1).clamp(max=6)
    obs[:, 0] += 6 - obs.sum(1)
    return obs


def test_multinomial_tests_match_utils() -> None:
    generator = torch.Generator().manual_seed(0)
    obs = _counts(generator, 9)
    obs[3] = math.nan
    reference = torch.randint(0, 6, (12, N_CLASSES), generator=generator).double()
    groups = torch.tensor([0] * 5 + [1] * 7)  # class 2 has no reference sample
    prior = torch.tensor([[1.0, 2.0, 0.5], [0.2, 1.0, 3.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    for mode in MultinomialTestMode:
        sums = torch.zeros(N_CLASSES, N_CLASSES, dtype=torch.float64)
        sums.index_add_(0, groups, reference)
        params = {"mle": sums, "map": sums + prior - 1, "dcm": sums + prior}[mode.value]
        result = multinomial_tests(obs, params, mode)
        for c in range(N_CLASSES):
            test = multinomial_test(reference[groups == c], prior[c], mode)
            expected = test(obs)
            expected = expected.masked_fill(expected.isnan() | (expected == INF), INF)
            torch.testing.assert_close(result[c], expected)


def test_layer_subsets() -> None:
    assert layer_subsets(4, 1, consecutive=False) == [(0,), (1,), (2,), (3,)]
    assert layer_subsets(4, 2, consecutive=True) == [(0, 1), (1, 2), (2, 3)]
    assert layer_subsets(3, 2, consecutive=False) == [(0, 1), (0, 2), (1, 2)]
    assert layer_subsets(3, 3, consecutive=False) == [(0, 1, 2)]
    assert layer_subsets(2, 3, consecutive=True) == []


def _naive_pvalues(query: Tensor, calib: Tensor, subsets: list[tuple[int, ...]]) -> Tensor:
    """Loop: ``p[c, j, s] = #{i : calib[c, l, i] >= query[c, j, l] for all l in s} / n``."""
    n_classes, nq, _ = query.shape
    n = calib.shape[-1]
    p = torch.zeros((n_classes, nq, len(subsets)), dtype=torch.float64)
    for c, j, (s, subset) in itertools.product(range(n_classes), range(nq), enumerate(subsets)):
        hits = sum(all(calib[c, l, i] >= query[c, j, l] for l in subset) for i in range(n))
        p[c, j, s] = hits / n
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subset_pvalues_match_loop(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    n_layers, n = 3, 7
    calib = torch.randint(0, 4, (N_CLASSES, n_layers, n), generator=generator).to(dtype)
    calib[0, 1, 2] = INF
    query = torch.randint(-1, 5, (N_CLASSES, 5, n_layers), generator=generator).to(dtype)
    query[1, 0] = INF  # only the +inf calibration value is as extreme
    query[:, 2] = calib[:, :, 3]  # ties count as extreme
    subsets = [(2,), (0, 1), (0,), (0, 1, 2), (1, 2)]
    result = subset_pvalues(query, calib, calib.sort(dim=-1).values, subsets)
    assert result.dtype == torch.float64
    assert result.shape == (N_CLASSES, 5, len(subsets))
    torch.testing.assert_close(result, _naive_pvalues(query, calib, subsets), rtol=0, atol=0)
    singles = subset_pvalues(query, None, calib.sort(dim=-1).values, [(1,)])
    torch.testing.assert_close(singles, _naive_pvalues(query, calib, [(1,)]), rtol=0, atol=0)
    joints = subset_pvalues(query, calib, None, [(0, 2)])
    torch.testing.assert_close(joints, _naive_pvalues(query, calib, [(0, 2)]), rtol=0, atol=0)
    assert subset_pvalues(query, calib, None, []).shape == (N_CLASSES, 5, 0)


def test_chunk_bounds_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows (the patched bounds) give exactly the one-block results."""
    generator = torch.Generator().manual_seed(2)
    obs = _counts(generator, 11)
    params = torch.rand(N_CLASSES, N_CLASSES, generator=generator, dtype=torch.float64) + 1
    calib = torch.rand(N_CLASSES, 3, 6, generator=generator, dtype=torch.float64)
    query = torch.rand(N_CLASSES, 11, 3, generator=generator, dtype=torch.float64)
    subsets = [(0,), (0, 1), (1, 2), (0, 1, 2)]

    def run() -> list[Tensor]:
        tests = [multinomial_tests(obs, params, mode) for mode in MultinomialTestMode]
        return [*tests, subset_pvalues(query, calib, calib.sort(dim=-1).values, subsets)]

    whole = run()
    monkeypatch.setattr(jtla_stats, "_MAX_TEST_ELEMENTS", 2 * N_CLASSES * N_CLASSES)
    monkeypatch.setattr(jtla_stats, "_MAX_COMPARE_ELEMENTS", 3 * N_CLASSES * 6 * 3)
    for chunked, expected in zip(run(), whole, strict=True):
        assert torch.equal(chunked, expected)
