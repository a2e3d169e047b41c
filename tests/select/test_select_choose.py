"""`scio.select.choose` and the rank-average combination."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.select.test_select_tune import CountingNet, _data, _recorder, naive_auroc

from scio.scores import KNN, Energy, ReAct, Softmax
from scio.select import RankAverage, choose, reference_ranks, tune


def naive_rank(reference: list[float], x: float) -> float:
    """Mid-rank at reference values, linear between them, the documented tails outside."""
    ref = sorted(reference)
    m = len(ref)
    values = sorted(set(ref))
    mids = [(sum(r < v for r in ref) + sum(r == v for r in ref) / 2) / m for v in values]
    spread = (values[-1] - values[0]) or 1.0
    if math.isnan(x):
        return math.nan
    if x == -math.inf:
        return 0.0
    if x == math.inf:
        return 1.0
    if x < values[0]:
        return mids[0] / (1 + (values[0] - x) / spread)
    if x > values[-1]:
        return 1 - (1 - mids[-1]) / (1 + (x - values[-1]) / spread)
    for lo, hi, m_lo, m_hi in zip(values, values[1:], mids, mids[1:]):
        if lo <= x <= hi:
            return m_lo + (m_hi - m_lo) * (x - lo) / (hi - lo)
    return mids[0]  # a single reference value


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_ranks_against_a_naive_loop(dtype: type) -> None:
    rng = np.random.default_rng(0)
    reference = np.r_[rng.normal(size=12), 0.5, 0.5, 0.5].astype(dtype)  # with ties
    x = np.r_[rng.normal(scale=3, size=40), 0.5, reference[:3], np.nan, np.inf, -np.inf]
    x = x.astype(dtype)
    got = reference_ranks(reference, x)
    expected = [naive_rank([float(r) for r in reference], float(v)) for v in x]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15, equal_nan=True)
    finite = np.sort(x[np.isfinite(x)].astype(np.float64))
    ranks = reference_ranks(reference, np.unique(finite))
    assert np.all(np.diff(ranks) > 0)  # strictly increasing, also outside the reference
    assert np.all((ranks > 0) & (ranks < 1))
    assert reference_ranks([2.0], [1.0, 2.0, 3.0]).tolist() == pytest.approx([0.25, 0.5, 0.75])


def test_reference_ranks_refuse_a_bad_reference() -> None:
    with pytest.raises(ValueError, match="finite"):
        reference_ranks([1.0, np.nan], [0.0])
    with pytest.raises(ValueError, match="finite"):
        reference_ranks([], [0.0])


def test_choose_equals_tune_per_candidate_with_one_forward_per_batch() -> None:
    data = _data()
    counting = CountingNet(data["net"]).eval()
    rnet = _recorder(counting, data["calib"], "net.flatten")
    val = (data["val_id"], data["val_ood"])
    grids = [{"k": [1, 3, 6]}, {"temperature": [0.5, 2.0]}, {"percentile": [50.0, 90.0]}]
    scores = [KNN(k=2), Energy(), ReAct()]
    counting.sizes.clear()
    choice = choose(list(zip(scores, grids)), rnet, data["calib"], *val, batch_size=10,
                    show_progress=False)  # fmt: skip
    assert counting.data_forwards() == 4 + 3 + 3  # all 7 grid points: one forward per batch
    alone = [tune(s, g, rnet, data["calib"], *val, batch_size=10, show_progress=False)
             for s, g in zip(scores, grids)]  # fmt: skip
    for got, expected in zip(choice.results, alone):
        assert got.table.rows == expected.table.rows
        assert got.best_params == expected.best_params
    best_values = [r.best_value for r in alone]
    assert choice.best == int(np.argmax(best_values))
    assert choice.score is choice.results[choice.best].score
    assert choice.best_params == alone[choice.best].best_params
    table = choice.table
    assert len(table) == 3 + 2 + 2
    assert table.column("candidate") == [0, 0, 0, 1, 1, 2, 2]
    assert table.column("score") == ["KNN(k=2)"] * 3 + ["Energy()"] * 2 + ["ReAct()"] * 2
    assert list(table.values()) == [v for r in alone for v in r.table.values()]
    assert table.columns[-1] == "auroc"


def test_fitted_candidates_are_evaluated_without_refit() -> None:
    data = _data()
    rnet = _recorder(data["net"], data["calib"], (1, 4))
    fitted = KNN(k=4).fit(rnet, data["calib"])
    state = fitted.__dict__.copy()
    choice = choose(
        [fitted, (Softmax(), None, ())], data["net"], data["calib"], data["val_id"],
        data["val_ood"], show_progress=False, names=["knn", "softmax"],
    )  # fmt: skip
    assert choice.results[0].score is fitted
    assert fitted.__dict__["_is_fit"] and fitted.__dict__.keys() == state.keys()
    ind = fitted.confidence(data["val_id"]).double().numpy()
    ood = fitted.confidence(data["val_ood"]).double().numpy()
    assert choice.results[0].best_value == pytest.approx(naive_auroc(ind, ood), abs=1e-12)
    assert choice.names == ["knn", "softmax"]
    assert choice.name == ["knn", "softmax"][choice.best]


def test_rank_average_of_the_top_candidates() -> None:
    data = _data()
    rnet = _recorder(data["net"], data["calib"], (1, 4))
    val = (data["val_id"], data["val_ood"])
    candidates = [(KNN(k=2), {"k": [1, 5]}), (Energy(), None), (Softmax(), None),
                  (ReAct(), {"percentile": [60.0, 95.0]})]  # fmt: skip
    choice = choose(candidates, rnet, data["calib"], *val, combine=3, show_progress=False)
    values = [r.best_value for r in choice.results]
    members = choice.combination_members
    assert members == sorted(range(4), key=lambda i: -values[i])[:3]  # stable: ties keep order
    combination = choice.combination
    assert isinstance(combination, RankAverage) and len(combination.scores) == 3
    # naive: each member's validation confidences ranked among its own InD ones, averaged
    ranks_id, ranks_ood = [], []
    for i in members:
        ind, ood = choice.results[i].val_confidences
        ranks_id.append([naive_rank(list(ind), v) for v in ind])
        ranks_ood.append([naive_rank(list(ind), v) for v in ood])
    comb_id, comb_ood = np.mean(ranks_id, axis=0), np.mean(ranks_ood, axis=0)
    assert choice.combination_value == pytest.approx(naive_auroc(comb_id, comb_ood), abs=1e-12)
    # the callable scores new inputs the same way, with one forward
    test = torch.randn(9, 1, 4, 4)
    confs = [choice.results[i].score.confidence(test).double().numpy() for i in members]
    np.testing.assert_allclose(combination(test).numpy(), combination.combine(confs), atol=0)
    expected = np.mean(
        [[naive_rank(list(choice.results[i].val_confidences[0]), v) for v in conf]
         for i, conf in zip(members, confs)], axis=0,
    )  # fmt: skip
    np.testing.assert_allclose(combination(test).numpy(), expected, rtol=1e-12)
    assert "RankAverage(" in repr(combination)


def test_choose_bad_input() -> None:
    data = _data()
    rnet = _recorder(data["net"], data["calib"], (1, 4))
    args = (rnet, data["calib"], data["val_id"], data["val_ood"])
    with pytest.raises(ValueError, match="`candidates` is empty"):
        choose([], *args, show_progress=False)
    with pytest.raises(TypeError, match=r"`candidates\[0\]` must be a score"):
        choose([("KNN",)], *args, show_progress=False)
    with pytest.raises(ValueError, match=r"`candidates\[1\] grid` names unknown parameter"):
        choose([(KNN(k=1), {"k": [1]}), (Energy(), {"k": [1]})], *args, show_progress=False)
    with pytest.raises(ValueError, match="`combine` must be a non-negative integer"):
        choose([KNN(k=1)], *args, combine=-1, show_progress=False)
    with pytest.raises(ValueError, match="one name per candidate"):
        choose([KNN(k=1)], *args, names=["a", "b"], show_progress=False)
