"""Trust score against a naive float64 computation with plain loops."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification.trust import Trust

LAYERS = ((1, 3), (1, 5))
N_CLASSES = 3


def _features(rnet: Recorder, x: Tensor) -> list[list[float]]:
    with torch.no_grad():
        rnet(x)
    return torch.cat([a.flatten(1) for a in rnet.activations.values()], dim=1).double().tolist()


def _sq(a: list[float], b: list[float]) -> float:
    return sum((u - v) ** 2 for u, v in zip(a, b, strict=True))


def _naive_trust(
    calib: list[list[float]], labels: list[int], test: list[list[float]], alpha: float, k: int
) -> list[list[float]]:
    kept: dict[int, list[list[float]]] = {}
    for c in range(N_CLASSES):
        population = [x for x, y in zip(calib, labels, strict=True) if y == c]
        if not population:
            continue
        n_remove = int(alpha * len(population))
        if n_remove:
            # Density estimate: squared distance to the k-th nearest *other* point (inf if
            # the class has <= k points); remove the largest ones, first points on ties.
            kth = []
            for i, x in enumerate(population):
                others = sorted(_sq(x, z) for j, z in enumerate(population) if j != i)
                kth.append(others[k - 1] if len(others) >= k else math.inf)
            order = sorted(range(len(population)), key=lambda i: -kth[i])
            removed = set(order[:n_remove])
            population = [x for i, x in enumerate(population) if i not in removed]
        kept[c] = population
    result = []
    for query in test:
        d = [
            math.sqrt(min(_sq(query, x) for x in kept[c])) if c in kept else math.inf
            for c in range(N_CLASSES)
        ]
        m1, m2 = sorted(range(N_CLASSES), key=lambda c: d[c])[:2]
        row = []
        for c in range(N_CLASSES):
            num, den = (d[m2], d[m1]) if c == m1 else (d[m1], d[c])
            ratio = num / den if den != 0 and not (math.isinf(num) and math.isinf(den)) else None
            if ratio is None:
                ratio = math.inf if num > 0 and den == 0 else 1.0
            row.append(ratio)
        result.append(row)
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("alpha", "k"), [(0.0, 10), (0.3, 1), (0.5, 4)])
def test_trust_matches_naive(dtype: torch.dtype, alpha: float, k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    net = make_net(dtype=dtype)
    calib = torch.rand(40, 1, 4, 4, generator=generator).to(dtype)
    labels = torch.randint(0, 2, (40,), generator=generator)  # class 2 absent
    test = torch.rand(6, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = Trust(alpha=alpha, k=k).fit(rnet, calib, labels)
    assert not (score.kept_labels == 2).any()
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (6, N_CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(out, net(test))
    expected = torch.tensor(
        _naive_trust(_features(rnet, calib), labels.tolist(), _features(rnet, test), alpha, k),
        dtype=torch.float64,
    )
    assert torch.equal(conformity[:, 2], torch.zeros(6, dtype=dtype))
    tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    torch.testing.assert_close(conformity.double(), expected, atol=tol, rtol=tol)


def test_trust_small_class_and_dataloader() -> None:
    """A class with <= k points: every density estimate is infinite (faiss filler), the
    removed points are the first ones of the class."""
    generator = torch.Generator().manual_seed(0)
    calib = torch.rand(30, 1, 4, 4, generator=generator, dtype=torch.float64)
    labels = torch.zeros(30, dtype=torch.int64)
    labels[[3, 11, 17, 25]] = 1  # 4 points, k = 5: int(0.5 * 4) = 2 removed (3 and 11)
    labels[[5, 6]] = 2
    test = torch.rand(6, 1, 4, 4, generator=generator, dtype=torch.float64)
    rnet = Recorder(make_net(dtype=torch.float64), input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = Trust(alpha=0.5, k=5).fit(rnet, calib, labels)
    assert torch.bincount(score.kept_labels).tolist() == [12, 2, 1]
    expected = _naive_trust(
        _features(rnet, calib), labels.tolist(), _features(rnet, test), alpha=0.5, k=5
    )
    conformity = score(test)[1]
    torch.testing.assert_close(conformity, torch.tensor(expected, dtype=torch.float64))
    loader = DataLoader(TensorDataset(calib, labels), batch_size=7)
    torch.testing.assert_close(Trust(alpha=0.5, k=5).fit(rnet, loader)(test)[1], conformity)


def test_trust_undefined_ratios_give_one() -> None:
    generator = torch.Generator().manual_seed(1)
    calib = torch.rand(10, 1, 4, 4, generator=generator, dtype=torch.float64)
    calib[1] = calib[0]
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 2, 2])
    rnet = Recorder(make_net(dtype=torch.float64), input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = Trust(alpha=0.0, k=2).fit(rnet, calib, labels)
    # Samples 0 and 1 lie at distance 0 of classes 0 and 1 (same batch: identical features).
    conformity = score(calib)[1][:2]
    assert torch.equal(conformity[:, :2], torch.ones(2, 2, dtype=torch.float64))  # 0/0
    assert torch.equal(conformity[:, 2], torch.zeros(2, dtype=torch.float64))  # 0/d
    # Sample 2 is a calibration point of class 0 only: infinite trust in class 0.
    assert score(calib)[1][2, 0] == math.inf


def test_trust_checks() -> None:
    generator = torch.Generator().manual_seed(2)
    calib = torch.rand(12, 1, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    rnet = Recorder(make_net(), input_data=calib[[0]])
    rnet.record((1, 4))
    for params in ({"alpha": 1.0}, {"alpha": -0.1}, {"alpha": 0.1, "k": 0}, {"alpha": 0, "k": 13}):
        with pytest.raises(AssertionError):
            Trust(**params).fit(rnet, calib, labels)
    with pytest.raises(RuntimeError, match=r"Missing parameters for Trust score: \('alpha',\)"):
        Trust().fit(rnet, calib, labels)
    with pytest.raises(ValueError, match="shape"):
        Trust(alpha=0.1, k=2).fit(rnet, calib, labels[:-1])
    with pytest.raises(ValueError, match="integer dtype"):
        Trust(alpha=0.1, k=2).fit(rnet, calib, labels.double())
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        Trust(alpha=0.1, k=2).fit(rnet, calib, labels + 1)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        Trust(alpha=0.1, k=2).fit(rnet, DataLoader(TensorDataset(calib, labels - 1), batch_size=7))
    before = calib.clone()
    score = Trust(alpha=0.1, k=2).fit(rnet, calib, labels)
    score(calib)
    assert torch.equal(calib, before) and not calib.requires_grad
    assert repr(score) == "Trust[fit](act_norm=None, mode='raw', alpha=0.1, k=2)"
