"""AdaScale against a naive per-sample float64 computation, and its checks."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from tests.conftest import make_net
from tests.scores.test_ash import naive_linear
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import scio
from scio.recorder import Recorder
from scio.scores import AdaScale
from scio.scores.classification.adascale import adascale_factor, adascale_perturb, ecdf_percentile

PARAMS = {"percentile": (30.0, 70.0), "k1": 20.0, "k2": 10.0, "lmbda": 3.0, "o": 0.1}


def _features(net: nn.Module, x: Tensor) -> Tensor:
    return net.flatten(net.pool(net.softplus(net.conv(x))))


def naive_statistic(net: nn.Module, sample: Tensor, k1: float, k2: float, lmbda: float, o: float):
    """``(h, Q')`` of one sample, float64, with Python lists for the selections."""
    xi = sample[None].double().clone().requires_grad_()
    logits = net(xi)[0]
    top = max(range(len(logits)), key=lambda c: float(logits[c].detach()))
    (grad,) = torch.autograd.grad(logits[top], xi)
    g = grad.flatten().tolist()
    n_pixels = int(len(g) * o)
    smallest = sorted(range(len(g)), key=lambda i: abs(g[i]))[:n_pixels]
    flat = xi.detach().flatten().clone()
    for i in smallest:
        flat[i] += 0.5 * (0.0 if g[i] == 0 else math.copysign(1.0, g[i]))
    with torch.no_grad():
        h = _features(net, xi.detach())[0].tolist()
        h_pert = _features(net, flat.reshape(xi.shape))[0].tolist()
    d = len(h)
    order = sorted(range(d), key=lambda j: -h[j])
    c1 = sum(max(h_pert[j], 0.0) for j in order[: max(int(d * k1 / 100), 1)])
    c2 = sum(abs(h[j] - h_pert[j]) for j in order[: max(int(d * k2 / 100), 1)])
    return h, c1 + lmbda * c2


def naive_adascale(net: nn.Module, calib: Tensor, test: Tensor, variant: str, **p) -> Tensor:
    net = copy.deepcopy(net).double()
    calib_q = [naive_statistic(net, x, p["k1"], p["k2"], p["lmbda"], p["o"])[1] for x in calib]
    low, high = p["percentile"]
    result = []
    for x in test:
        h, q = naive_statistic(net, x, p["k1"], p["k2"], p["lmbda"], p["o"])
        ecdf = sum(c <= q for c in calib_q) / len(calib_q)
        percentile = low + (1 - ecdf) * (high - low)
        d = len(h)
        kept = min(max(d - round(d * percentile / 100), 1), d)  # round: half to even
        relu = [max(v, 0.0) for v in h]
        ratio = sum(relu) / sum(sorted(relu, reverse=True)[:kept])
        if variant == "a":
            logits = naive_linear([v * math.exp(ratio) for v in h], net.fc.weight, net.fc.bias)
        else:
            logits = [z * ratio**2 for z in naive_linear(h, net.fc.weight, net.fc.bias)]
        top = max(logits)
        result.append(top + math.log(sum(math.exp(z - top) for z in logits)))
    return torch.tensor(result, dtype=torch.float64)


def _setup(dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor, Recorder]:
    generator = torch.Generator().manual_seed(seed)
    net = make_net(n_channels=2, size=6, dtype=dtype, seed=seed)  # d = 27 features
    calib = torch.rand(20, 2, 6, 6, generator=generator).to(dtype)
    test = torch.rand(9, 2, 6, 6, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    return net, calib, test, rnet


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("variant", ["a", "l"])
def test_adascale_matches_naive(dtype: torch.dtype, variant: str) -> None:
    net, calib, test, rnet = _setup(dtype)
    score = AdaScale(variant=variant, **PARAMS).fit(rnet, calib)
    out, conformity = score(test)
    with torch.no_grad():
        assert torch.equal(out, net(test))
    assert conformity.dtype == dtype
    assert conformity.shape == (9, 3)
    expected = naive_adascale(net, calib, test, variant, **PARAMS)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(conformity[:, 0].double(), expected, rtol=tol, atol=tol)
    assert torch.equal(conformity, conformity[:, :1].expand(9, 3))


def test_calibration_statistics_are_the_naive_ones_and_subsampled_evenly() -> None:
    net, calib, _, rnet = _setup(torch.float64, seed=1)
    score = AdaScale(**PARAMS, num_samples=None).fit(rnet, calib)
    naive = sorted(naive_statistic(net, x, 20.0, 10.0, 3.0, 0.1)[1] for x in calib)
    torch.testing.assert_close(score.calib_statistic, torch.tensor(naive, dtype=torch.float64))
    kept = AdaScale(**PARAMS, num_samples=7).fit(rnet, calib)
    per_sample = [naive_statistic(net, x, 20.0, 10.0, 3.0, 0.1)[1] for x in calib]
    positions = [i * 20 // 7 for i in range(7)]  # 0, 2, 5, 8, 11, 14, 17
    expected = sorted(per_sample[i] for i in positions)
    torch.testing.assert_close(kept.calib_statistic, torch.tensor(expected, dtype=torch.float64))


def test_perturbation_moves_the_least_sensitive_elements() -> None:
    x = torch.zeros(2, 1, 2, 3)
    grad = torch.tensor([[1.0, -0.1, 0.5, -0.2, 3.0, 0.0], [-2.0, 0.3, -0.4, 1.0, 0.2, -5.0]])
    moved = adascale_perturb(x, grad.reshape(2, 1, 2, 3), o=0.5)  # 3 of 6 elements
    expected = torch.tensor([[0.0, -0.5, 0.0, -0.5, 0.0, 0.0], [0.0, 0.5, -0.5, 0.0, 0.5, 0.0]])
    torch.testing.assert_close(moved.reshape(2, 6), expected)
    assert adascale_perturb(x, grad.reshape(x.shape), o=0.1) is x  # int(0.6) = 0 elements


def test_factor_and_ecdf_on_hand_made_values() -> None:
    h = torch.tensor([[3.0, -1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # K = 4 - round(4 · 60 / 100) = 4 - 2 = 2: (3 + 0 + 1 + 2) / (3 + 2); zeros: ratio 1
    ratio = adascale_factor(h, torch.tensor([60.0, 99.0], dtype=torch.float64))
    torch.testing.assert_close(ratio, torch.tensor([6 / 5, 1.0], dtype=torch.float64))
    calib = torch.tensor([1.0, 2.0, 2.0, 5.0])
    q = torch.tensor([0.5, 2.0, 9.0, math.nan])
    percentile = ecdf_percentile(q, calib, 10.0, 50.0)  # ECDF 0, 3/4, 1, (NaN: high)
    torch.testing.assert_close(percentile, torch.tensor([50.0, 20.0, 10.0, 50.0]).double())


def test_tensor_and_loader_fits_agree_and_max_batch_does_not_matter() -> None:
    _, calib, test, rnet = _setup(torch.float64, seed=2)
    labels = torch.zeros(len(calib), dtype=torch.int64)
    one = AdaScale(**PARAMS).fit(rnet, calib)
    loader = DataLoader(TensorDataset(calib, labels), batch_size=7)
    streamed = AdaScale(**PARAMS, max_batch=4).fit(rnet, loader)
    torch.testing.assert_close(streamed.calib_statistic, one.calib_statistic)
    torch.testing.assert_close(streamed(test)[1], one(test)[1])
    one.max_batch = 2  # inference-only: stays fit
    assert one.is_fit
    torch.testing.assert_close(one(test)[1], streamed(test)[1])


def test_save_load_round_trip(tmp_path: Path) -> None:
    net, calib, test, rnet = _setup(torch.float32, seed=3)
    score = AdaScale(variant="l", **PARAMS).fit(rnet, calib)
    score.save(tmp_path / "adascale.pt")
    loaded = scio.load_score(tmp_path / "adascale.pt", net)
    assert loaded.params == score.params
    torch.testing.assert_close(loaded(test)[1], score(test)[1], rtol=0, atol=0)


def test_parameter_checks() -> None:
    cases = [
        ({"variant": "b"}, r"`variant` must be one of \('a', 'l'\) \(got 'b'\)"),
        ({"percentile": (90.0, 80.0)}, r"`percentile` must satisfy 0 < p_min <= p_max < 100"),
        ({"percentile": (0.0, 80.0)}, r"`percentile` must satisfy 0 < p_min <= p_max < 100"),
        ({"percentile": (10.0, 100.0)}, r"`percentile` must satisfy 0 < p_min <= p_max < 100"),
        ({"percentile": 80.0}, r"`percentile` must be a pair \(p_min, p_max\)"),
        ({"percentile": (10.0, math.nan)}, r"`percentile` must satisfy"),
        ({"k1": "5"}, r"`k1` must be a percentage in \(0, 100\] \(got '5'\)"),
        ({"k2": 0}, r"`k2` must be a percentage in \(0, 100\] \(got 0\)"),
        ({"lmbda": -1.0}, r"`lmbda` must be a finite number >= 0 \(got -1.0\)"),
        ({"o": 1.5}, r"`o` must be a fraction in \[0, 1\] \(got 1.5\)"),
        ({"num_samples": 0}, r"`num_samples` must be a positive integer or None \(got 0\)"),
        ({"max_batch": 0}, r"`max_batch` must be a positive integer or None \(got 0\)"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            AdaScale(**params)
    score = AdaScale()
    with pytest.raises(ValueError, match="`k1`"):
        score.k1 = math.inf
    assert score.k1 == 5.0  # refused values are not set
    assert AdaScale(percentile=[60, 70]).percentile == [60, 70]  # OpenOOD configs give lists


def test_openood_defaults() -> None:
    score = AdaScale()
    assert (score.variant, score.percentile, score.k1, score.k2) == ("a", (75.0, 85.0), 5.0, 1.0)
    assert (score.lmbda, score.o, score.num_samples) == (10.0, 0.05, 5000)
