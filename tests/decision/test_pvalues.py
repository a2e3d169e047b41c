"""Conformal p-values, Benjamini–Hochberg and combinations, against naive float64 code."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from scipy import stats
from tests.conftest import DTYPES
from torch import Tensor

from scio.decision import pvalues as P

FALSE_FAILURE = 1e-6  # probability that a statistical check below fails on correct code


# -- naive references (loops, float64, written from the definitions) -----------------------
def naive_p(holdout: list[float], test: list[float]) -> list[float]:
    n = len(holdout)
    return [(1 + sum(1 for h in holdout if h <= s)) / (n + 1) for s in test]


def naive_group_p(
    holdout: list[float], hg: list[int], test: list[float], tg: list[int]
) -> list[float]:
    out = []
    for s, c in zip(test, tg):
        mine = [h for h, g in zip(holdout, hg) if g == c]
        out.append((1 + sum(1 for h in mine if h <= s)) / (len(mine) + 1))
    return out


def naive_bh(p: list[float], alpha: float) -> list[bool]:
    m = len(p)
    ordered = sorted(p)
    k = 0
    for j in range(1, m + 1):
        if ordered[j - 1] <= j * alpha / m:
            k = j
    if k == 0:
        return [False] * m
    cut = ordered[k - 1]
    return [x <= cut for x in p]


def upper_limit(trials: int, rate: float, tail: float = FALSE_FAILURE) -> int:
    """Count exceeded with probability < ``tail`` by a Binomial(trials, q), any q <= rate."""
    return int(stats.binom.isf(tail, trials, rate))


def lower_limit(trials: int, rate: float, tail: float = FALSE_FAILURE) -> int:
    """Count undershot with probability < ``tail`` by a Binomial(trials, rate)."""
    return int(stats.binom.ppf(tail, trials, rate)) - 1


# -- exact formulas on hand-made data --------------------------------------------------------
def test_hand_made_values() -> None:
    holdout = torch.tensor([0.1, 0.4, 0.4, 0.9])
    test = torch.tensor([0.0, 0.1, 0.4, 0.5, 1.0, -torch.inf, torch.inf])
    expected = torch.tensor([1, 2, 4, 4, 5, 1, 5], dtype=torch.float64) / 5
    assert torch.equal(P.conformal_p_values(holdout, test), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_naive_with_ties(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    holdout = torch.randint(-5, 6, (200,), generator=gen).to(dtype) / 4
    test = torch.randint(-6, 7, (150,), generator=gen).to(dtype) / 4
    p = P.conformal_p_values(holdout, test)
    assert p.dtype == torch.float64 and p.shape == (150,)
    ref = naive_p(holdout.double().tolist(), test.double().tolist())
    assert p.tolist() == ref
    assert bool((p > 0).all() and (p <= 1).all())


def test_several_rows_match_row_by_row() -> None:
    gen = torch.Generator().manual_seed(1)
    holdout = torch.randn(3, 50, generator=gen)
    test = torch.randn(3, 20, generator=gen)
    p = P.conformal_p_values(holdout, test)
    for k in range(3):
        assert p[k].tolist() == naive_p(holdout[k].tolist(), test[k].tolist())


@pytest.mark.parametrize("dtype", DTYPES)
def test_groups_match_naive(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    holdout = (torch.randn(120, generator=gen) * 3).round().to(dtype)
    test = (torch.randn(80, generator=gen) * 3).round().to(dtype)
    hg = torch.randint(0, 4, (120,), generator=gen)
    hg[hg == 3] = 2  # group 3 has no holdout point
    tg = torch.randint(0, 4, (80,), generator=gen)
    p = P.conformal_p_values(holdout, test, holdout_groups=hg, test_groups=tg, n_groups=4)
    ref = naive_group_p(holdout.double().tolist(), hg.tolist(), test.double().tolist(), tg.tolist())
    assert p.tolist() == ref
    assert bool((p[tg == 3] == 1).all())


def test_sorted_holdout_reuse_gives_same_p_values() -> None:
    gen = torch.Generator().manual_seed(3)
    holdout, test = torch.randn(2, 40, generator=gen), torch.randn(2, 9, generator=gen)
    hg, tg = torch.randint(0, 3, (40,), generator=gen), torch.randint(0, 3, (9,), generator=gen)
    prepared = P.sorted_holdout(holdout, hg, 3)
    direct = P.conformal_p_values(holdout, test, holdout_groups=hg, test_groups=tg, n_groups=3)
    assert torch.equal(P.conformal_p_values(prepared, test, test_groups=tg), direct)


def test_randomised_p_values_break_ties_only() -> None:
    gen = torch.Generator().manual_seed(4)
    holdout = torch.randint(0, 4, (30,), generator=gen).double()
    test = torch.randint(0, 4, (500,), generator=gen).double()
    det = P.conformal_p_values(holdout, test)
    rnd = P.conformal_p_values(holdout, test, randomize=True, generator=gen)
    n_lt = torch.tensor([sum(1 for h in holdout.tolist() if h < s) for s in test.tolist()])
    assert bool((rnd > n_lt / 31).all() and (rnd <= det).all())
    # without ties, U only spreads the p-value over its lattice cell (det - 1/(n+1), det]
    h, t = torch.randn(30, generator=gen), torch.randn(50, generator=gen)
    det_c = P.conformal_p_values(h, t)
    rnd_c = P.conformal_p_values(h, t, randomize=True, generator=gen)
    assert bool((rnd_c <= det_c).all() and (rnd_c > det_c - 1 / 31).all())
    # seeded: reproducible
    a = P.conformal_p_values(
        holdout, test, randomize=True, generator=torch.Generator().manual_seed(9)
    )
    b = P.conformal_p_values(
        holdout, test, randomize=True, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(a, b)


def test_nan_and_shape_errors() -> None:
    with pytest.raises(ValueError, match="`holdout` has 2 NaN conformities out of 4"):
        P.conformal_p_values(torch.tensor([0.0, math.nan, 1.0, math.nan]), torch.zeros(3))
    with pytest.raises(ValueError, match="`test` has 1 NaN"):
        P.conformal_p_values(torch.zeros(4), torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="`test` has 2 rows of conformities but `holdout` has 1"):
        P.conformal_p_values(torch.zeros(4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`test_groups` is needed"):
        P.conformal_p_values(
            torch.zeros(4),
            torch.zeros(3),
            holdout_groups=torch.zeros(4, dtype=torch.int64),
            n_groups=2,
        )
    with pytest.raises(ValueError, match=r"`test_groups` must have shape \(3,\)"):
        P.conformal_p_values(
            torch.zeros(4), torch.zeros(3), holdout_groups=torch.zeros(4, dtype=torch.int64),
            test_groups=torch.zeros(2, dtype=torch.int64), n_groups=1,
        )  # fmt: skip


# -- validity on exchangeable data (statistical tests) -------------------------------------
def _trials(
    draw: Callable[[int, torch.Generator], Tensor], trials: int, n: int, seed: int, **kwargs: Any
) -> Tensor:
    """One p-value per independent trial: a holdout of n and one test point, all i.i.d."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(trials, dtype=torch.float64)
    for t in range(trials):
        sample = draw(n + 1, gen)
        out[t] = P.conformal_p_values(sample[:n], sample[n:], **kwargs)[0]
    return out


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3])
def test_super_uniform_with_heavy_ties(alpha: float) -> None:
    trials, n = 3000, 39
    p = _trials(lambda k, g: torch.randint(0, 3, (k,), generator=g).double(), trials, n, seed=10)
    assert int((p <= alpha).sum()) <= upper_limit(trials, alpha)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_exact_rate_without_ties(alpha: float) -> None:
    # continuous data: P(p <= alpha) = floor(alpha (n + 1)) / (n + 1) exactly (two-sided check)
    trials, n = 3000, 39
    rate = math.floor(alpha * (n + 1) + 1e-9) / (n + 1)
    p = _trials(lambda k, g: torch.randn(k, generator=g), trials, n, seed=11)
    count = int((p <= alpha).sum())
    assert lower_limit(trials, rate, FALSE_FAILURE / 2) <= count
    assert count <= upper_limit(trials, rate, FALSE_FAILURE / 2)


def test_randomised_is_exactly_uniform_with_ties() -> None:
    trials, n, alpha = 3000, 19, 0.13  # alpha off the 1/(n+1) lattice
    gen = torch.Generator().manual_seed(12)
    p = _trials(
        lambda k, g: torch.randint(0, 2, (k,), generator=g).double(), trials, n, seed=13,
        randomize=True, generator=gen,
    )  # fmt: skip
    count = int((p <= alpha).sum())
    assert lower_limit(trials, alpha, FALSE_FAILURE / 2) <= count
    assert count <= upper_limit(trials, alpha, FALSE_FAILURE / 2)


def test_class_conditional_bound_holds_per_class() -> None:
    # group 1 is rare and its conformities are low: marginal p-values flag it far above
    # alpha, class-conditional ones keep P(flag | class) <= alpha in each class.
    trials, n, alpha = 2000, 200, 0.1
    gen = torch.Generator().manual_seed(14)
    counts = {0: 0, 1: 0}
    marginal_flags_1 = 0
    for t in range(trials):
        groups = (torch.rand(n, generator=gen) < 0.25).long()
        holdout = torch.randn(n, generator=gen) - 3.0 * groups
        c = t % 2
        test = torch.randn(1, generator=gen) - 3.0 * c
        tg = torch.tensor([c])
        p = P.conformal_p_values(holdout, test, holdout_groups=groups, test_groups=tg, n_groups=2)
        counts[c] += int(p[0] <= alpha)
        if c == 1:
            marginal_flags_1 += int(P.conformal_p_values(holdout, test)[0] <= alpha)
    for c in (0, 1):
        assert counts[c] <= upper_limit(trials // 2, alpha), c
    # marginal p-values flag about 40 % of class 1 (the option is what makes the bound hold)
    assert marginal_flags_1 > 2 * alpha * (trials // 2)


# -- combinations ------------------------------------------------------------------------------
def test_combination_formulas_against_naive() -> None:
    gen = torch.Generator().manual_seed(15)
    p = torch.rand(3, 40, generator=gen, dtype=torch.float64).clamp(min=1e-3)
    bonf = P.combine_p_values(p, "bonferroni")
    harm = P.combine_p_values(p, "harmonic")
    for j in range(40):
        col = p[:, j].tolist()
        assert bonf[j].item() == pytest.approx(min(1.0, 3 * min(col)), rel=1e-15)
        hmean = 3 / sum(1 / x for x in col)
        assert harm[j].item() == pytest.approx(min(1.0, math.e * math.log(3) * hmean), rel=1e-14)
    assert P.combination_factor(2, "harmonic") == 2.0
    assert P.combination_factor(1, "harmonic") == 1.0
    assert torch.equal(P.combine_p_values(p[:1], "harmonic"), p[0])
    with pytest.raises(ValueError, match="`combine` must be one of"):
        P.combine_p_values(p, "fisher")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(K, m\)"):
        P.combine_p_values(p[0])


@pytest.mark.parametrize("method", ["bonferroni", "harmonic"])
def test_combination_is_valid_for_dependent_scores(method: str) -> None:
    # three scores of the same exchangeable inputs: one, a noisy copy, its opposite
    trials, n, alpha = 3000, 59, 0.1
    gen = torch.Generator().manual_seed(16)
    count = 0
    for _ in range(trials):
        x = torch.randn(n + 1, generator=gen)
        scores = torch.stack([x, x + 0.3 * torch.randn(n + 1, generator=gen), -x])
        p = P.conformal_p_values(scores[:, :n], scores[:, n:])
        count += int(P.combine_p_values(p, method)[0] <= alpha)  # type: ignore[arg-type]
    assert count <= upper_limit(trials, alpha)


def test_min_holdout_size_and_smallest_p_value() -> None:
    assert P.min_holdout_size(0.05) == 19
    assert P.min_holdout_size(0.01) == 99
    assert P.min_holdout_size(0.3) == 3
    assert P.min_holdout_size(0.05, 2, "bonferroni") == 39
    for alpha in (0.05, 0.01, 0.07, 0.5):
        for k, method in ((1, "bonferroni"), (3, "bonferroni"), (3, "harmonic")):
            n = P.min_holdout_size(alpha, k, method)  # type: ignore[arg-type]
            assert float(P.smallest_p_value(n, k, method)) <= alpha  # type: ignore[arg-type]
            assert n == 0 or float(P.smallest_p_value(n - 1, k, method)) > alpha  # type: ignore[arg-type]
    for bad in (0.0, 1.0, -0.1, 2.0, math.nan):
        with pytest.raises(ValueError, match=r"`alpha` must be in \(0, 1\)"):
            P.check_alpha(bad)


def test_cut_ranks_agree_with_p_values() -> None:
    sizes = torch.tensor([19, 20, 99, 100, 3])
    for alpha in (0.05, 0.1, 0.25, 0.01):
        for factor in (1.0, 2.0, 3.0):
            ranks = P.cut_ranks(sizes, alpha, factor)
            for c, n in enumerate(sizes.tolist()):
                lattice = [
                    min(1.0, factor * (j / (n + 1))) if factor != 1.0 else j / (n + 1)
                    for j in range(1, n + 2)
                ]
                assert int(ranks[c]) == sum(1 for x in lattice if x <= alpha)


# -- Benjamini–Hochberg --------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5])
def test_bh_matches_naive(alpha: float) -> None:
    gen = torch.Generator().manual_seed(18)
    for m in (1, 2, 7, 50, 300):
        for _ in range(5):
            p = torch.rand(m, generator=gen, dtype=torch.float64) ** 3
            p = (p * 40).ceil() / 40  # ties
            assert P.benjamini_hochberg(p, alpha).tolist() == naive_bh(p.tolist(), alpha)
    assert P.benjamini_hochberg(torch.empty(0), alpha).shape == (0,)
    # step-up: a p-value above its own j alpha / m is rejected when a larger one passes
    p = torch.tensor([0.04, 0.045, 0.9])
    assert P.benjamini_hochberg(p, 0.1).tolist() == [True, True, False]
    assert P.benjamini_hochberg(torch.tensor([0.5, 0.9]), 0.1).tolist() == [False, False]
    with pytest.raises(ValueError, match=r"shape \(m,\)"):
        P.benjamini_hochberg(torch.zeros(2, 2), 0.1)


def test_bh_controls_fdr_with_conformal_p_values() -> None:
    # batches of 80 InD + 20 shifted inputs sharing a holdout: mean FDP <= alpha (+ slack)
    trials, n, alpha = 400, 200, 0.1
    gen = torch.Generator().manual_seed(19)
    fdp = torch.empty(trials, dtype=torch.float64)
    for t in range(trials):
        holdout = torch.randn(n, generator=gen)
        test = torch.cat([torch.randn(80, generator=gen), torch.randn(20, generator=gen) - 3])
        flags = P.benjamini_hochberg(P.conformal_p_values(holdout, test), alpha)
        fdp[t] = flags[:80].sum() / max(int(flags.sum()), 1)
    # FDP in [0, 1]: Hoeffding bound on the mean at failure probability 1e-6
    slack = math.sqrt(math.log(1 / FALSE_FAILURE) / (2 * trials))
    assert float(fdp.mean()) <= alpha + slack
