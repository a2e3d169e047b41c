"""DkNN against a naive float64 computation with plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification.dknn import DkNN

LAYERS = ((1, 3), (1, 5))
N_CLASSES = 3


def _features(rnet: Recorder, x: Tensor, act_norm: float | None) -> list[list[list[float]]]:
    with torch.no_grad():
        rnet(x)
    result = []
    for act in rnet.activations.values():
        feats = act.flatten(1)
        if act_norm is not None:
            norms = feats.double().norm(p=act_norm, dim=1, keepdim=True)
            feats = (feats.double() / norms).to(feats.dtype)
        result.append(feats.double().tolist())
    return result


def _faiss_knn(query: list[float], population: list[list[float]], metric: str, k: int) -> list[int]:
    """The reference's faiss flat search, simulated: scan in id order keeping ``k`` candidates;
    a candidate replaces the worst kept one only if strictly better, the worst being the
    lowest (similarity, id) for ``ip`` and the highest (distance, id) for ``l2``."""
    kept: list[tuple[float, int]] = []
    for j, ref in enumerate(population):
        if metric == "l2":
            value = -sum((a - b) ** 2 for a, b in zip(query, ref, strict=True))
            key = (value, -j)  # the worst: largest distance, then highest id
        else:
            value = sum(a * b for a, b in zip(query, ref, strict=True))
            key = (value, j)  # the worst: smallest similarity, then lowest id
        if len(kept) < k:
            kept.append(key)
        elif value > min(kept)[0]:
            kept.remove(min(kept))
            kept.append(key)
    return [abs(j) for _, j in kept]


def _faiss_self_knn(i: int, population: list[list[float]], metric: str, k: int) -> list[int]:
    """``self_query``: k + 1 neighbours, then drop the sample itself, or else the worst one."""
    found = _faiss_knn(population[i], population, metric, k + 1)
    if i in found:
        found.remove(i)
        return found

    def badness(j: int) -> tuple[float, int]:
        q, r = population[i], population[j]
        if metric == "l2":
            return (sum((a - b) ** 2 for a, b in zip(q, r, strict=True)), -j)
        return (-sum(a * b for a, b in zip(q, r, strict=True)), -j)

    found.remove(max(found, key=badness))  # faiss' last column: worst, lowest id among ties
    return found


def _naive_dknn(
    calib: list[list[list[float]]],
    labels: list[int],
    test: list[list[list[float]]],
    *,
    k: int,
    per_class: bool,
    per_layer: bool,
    aggregation: str | float,
    metric: str,
) -> np.ndarray:
    n_calib, n_test, n_layers = len(labels), len(test[0]), len(calib)
    votes = np.zeros((n_layers, n_test, N_CLASSES))
    agreement = np.zeros((n_layers, n_calib))
    for layer in range(n_layers):
        for i, query in enumerate(test[layer]):
            for j in _faiss_knn(query, calib[layer], metric, k):
                votes[layer, i, labels[j]] += 1
        for i in range(len(calib[layer])):
            others = _faiss_self_knn(i, calib[layer], metric, k)
            agreement[layer, i] = sum(labels[j] == labels[i] for j in others)
    if not per_layer:
        votes, agreement = votes.sum(0, keepdims=True), agreement.sum(0, keepdims=True)
    if not (per_class or per_layer):
        return votes[0]
    p = np.zeros(votes.shape)
    for row in range(len(votes)):
        for i in range(n_test):
            for c in range(N_CLASSES):
                ref = [j for j in range(n_calib) if labels[j] == c or not per_class]
                below = sum(agreement[row, j] < votes[row, i, c] for j in ref)
                p[row, i, c] = below / len(ref) if ref else 0.0
    if aggregation == "mean":
        return p.mean(0)
    if aggregation == "fisher":
        with np.errstate(divide="ignore"):
            return np.log(p).sum(0)
    if aggregation == "max":
        return p.max(0)
    assert isinstance(aggregation, float)
    return (np.abs(p) ** aggregation).sum(0) ** (1 / aggregation)


CASES = [
    # k, per_class, per_layer, aggregation, metric, act_norm
    (3, False, False, "mean", "l2", None),
    (5, True, False, "mean", "l2", 2.0),
    (4, False, True, "fisher", "ip", 2.0),
    (6, True, True, "max", "l2", None),
    (2, True, True, 2.0, "ip", 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("k", "per_class", "per_layer", "aggregation", "metric", "act_norm"), CASES
)
def test_dknn_matches_naive(
    dtype: torch.dtype,
    k: int,
    per_class: bool,
    per_layer: bool,
    aggregation: str | float,
    metric: str,
    act_norm: float | None,
) -> None:
    generator = torch.Generator().manual_seed(k)
    net = make_net(dtype=dtype)
    calib = torch.rand(30, 1, 4, 4, generator=generator).to(dtype)
    labels = torch.randint(0, 2, (30,), generator=generator)  # class 2 absent
    test = torch.rand(6, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = DkNN(
        k=k,
        per_class=per_class,
        per_layer=per_layer,
        aggregation=aggregation,
        index_metric=metric,
        act_norm=act_norm,
    )
    score.fit(rnet, calib, labels)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (6, N_CLASSES)
    assert not conformity.isnan().any()
    with torch.no_grad():
        torch.testing.assert_close(out, net(test))
    expected = _naive_dknn(
        _features(rnet, calib, act_norm),
        labels.tolist(),
        _features(rnet, test, act_norm),
        k=k,
        per_class=per_class,
        per_layer=per_layer,
        aggregation=aggregation,
        metric=metric,
    )
    tol = {torch.float16: 2e-3, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    np.testing.assert_allclose(conformity.double().numpy(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(("per_class", "per_layer"), [(True, False), (False, True)])
def test_dknn_k_equals_n_calib_and_dataloader(per_class: bool, per_layer: bool) -> None:
    """With k = n_calib the calibration agreements count the n_calib - 1 other points."""
    generator = torch.Generator().manual_seed(0)
    calib = torch.rand(12, 1, 4, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,), generator=generator)
    test = torch.rand(5, 1, 4, 4, generator=generator, dtype=torch.float64)
    rnet = Recorder(make_net(dtype=torch.float64), input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = DkNN(k=12, per_class=per_class, per_layer=per_layer).fit(rnet, calib, labels)
    conformity = score(test)[1]
    expected = _naive_dknn(
        _features(rnet, calib, None),
        labels.tolist(),
        _features(rnet, test, None),
        k=12,
        per_class=per_class,
        per_layer=per_layer,
        aggregation="mean",
        metric="l2",
    )
    np.testing.assert_allclose(conformity.numpy(), expected, rtol=1e-12, atol=1e-12)
    loader = DataLoader(TensorDataset(calib, labels), batch_size=7)
    batched = DkNN(k=12, per_class=per_class, per_layer=per_layer).fit(rnet, loader)
    torch.testing.assert_close(batched(test)[1], conformity)


def test_dknn_checks() -> None:
    generator = torch.Generator().manual_seed(2)
    calib = torch.rand(12, 1, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    rnet = Recorder(make_net(), input_data=calib[[0]])
    rnet.record((1, 4))
    for k in (0, 13):
        with pytest.raises(AssertionError):
            DkNN(k=k).fit(rnet, calib, labels)
    with pytest.raises(RuntimeError, match=r"Missing parameters for DkNN score: \('k',\)"):
        DkNN().fit(rnet, calib, labels)
    with pytest.raises(ValueError, match="'median' is not a valid AggrName"):
        DkNN(k=2, per_layer=True, aggregation="median").fit(rnet, calib, labels)
    with pytest.raises(ValueError, match="is not a valid IndexMetric"):
        DkNN(k=2, index_metric="cos").fit(rnet, calib, labels)
    with pytest.raises(ValueError, match="shape"):
        DkNN(k=2).fit(rnet, calib, labels[:-1])
    with pytest.raises(ValueError, match="integer dtype"):
        DkNN(k=2).fit(rnet, calib, labels.float())
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        DkNN(k=2).fit(rnet, calib, labels + 1)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        DkNN(k=2).fit(rnet, DataLoader(TensorDataset(calib, labels - 1), batch_size=7))
    before = calib.clone()
    score = DkNN(k=2, per_class=True).fit(rnet, calib, labels)
    _, conformity = score(calib)
    assert torch.equal(calib, before) and not calib.requires_grad
    assert not conformity.isnan().any()
    assert repr(score) == (
        "DkNN[fit](act_norm=None, mode='raw', k=2, per_class=True, per_layer=False, "
        "aggregation='mean', index_metric='l2')"
    )
    score.per_layer = True
    assert not score.is_fit
    assert math.isclose(float(DkNN(k=2).fit(rnet, calib, labels)(calib)[1].sum(1)[0]), 2)
