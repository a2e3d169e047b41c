"""VRA against an independent float64 computation of OpenOOD's formula."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import scio
from scio.index import sketch
from scio.recorder import Recorder
from scio.scores import VRA
from scio.scores.core.base import ParamError


def _features(net: nn.Module, x: Tensor) -> list[list[float]]:
    with torch.no_grad():
        return net.flatten(net.pool(net.softplus(net.conv(x)))).double().tolist()


def _percentile(values: list[float], p: float) -> float:
    """Linear interpolation between order statistics (numpy.percentile's default)."""
    ordered = sorted(values)
    position = p / 100 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _naive(net: nn.Module, calib: list, test: list, low_p: float, high_p: float) -> list[float]:
    values = [v for row in calib for v in row]
    low, high = _percentile(values, low_p), _percentile(values, high_p)
    weight = net.fc.weight.detach().double().tolist()
    bias = net.fc.bias.detach().double().tolist()
    result = []
    for row in test:
        clipped = [min(max(v, low), high) for v in row]
        logits = [
            sum(w * x for w, x in zip(ws, clipped, strict=True)) + b
            for ws, b in zip(weight, bias, strict=True)
        ]
        top = max(logits)
        result.append(top + math.log(sum(math.exp(z - top) for z in logits)))
    return result


def _setup(dtype: torch.dtype) -> tuple[nn.Module, Recorder, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    net = make_net(dtype=dtype, n_classes=4, seed=2)
    calib = (2 * torch.randn(30, 1, 4, 4, generator=generator)).to(dtype)
    test = (3 * torch.randn(9, 1, 4, 4, generator=generator)).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    return net, rnet, calib, test


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("low", "high"), [(10.0, 90.0), (0.0, 100.0), (5.0, 37.5)])
def test_vra_matches_naive(dtype: torch.dtype, low: float, high: float) -> None:
    net, rnet, calib, test = _setup(dtype)
    score = VRA(percentile_low=low, percentile_high=high).fit(rnet, calib)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (9, 4)
    assert torch.equal(conformity[:, 0], conformity[:, 3])
    expected = _naive(net, _features(net, calib), _features(net, test), low, high)
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(
        conformity[:, 0].double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=tol
    )
    streamed = VRA(percentile_low=low, percentile_high=high).fit(
        rnet, DataLoader(TensorDataset(calib, torch.zeros(30, dtype=torch.long)), batch_size=7)
    )
    torch.testing.assert_close(streamed.thresholds, score.thresholds, atol=tol, rtol=tol)
    torch.testing.assert_close(streamed(test)[1], conformity, atol=tol, rtol=tol)


def test_vra_thresholds_from_the_quantile_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the exact budget the thresholds come from summary blocks; blocks smaller than
    the summary size keep every value, so the result is still exact."""
    _, rnet, calib, test = _setup(torch.float64)
    exact = VRA(percentile_low=12.5, percentile_high=81.0).fit(rnet, calib)
    monkeypatch.setattr(sketch, "EXACT_BUDGET", 40)  # 32 values per batch of 4
    calls: list[float] = []
    original = VRA._sketched
    monkeypatch.setattr(VRA, "_sketched", lambda self, q: calls.append(q) or original(self, q))
    loader = DataLoader(TensorDataset(calib, torch.zeros(30, dtype=torch.long)), batch_size=4)
    sketched = VRA(percentile_low=12.5, percentile_high=81.0).fit(rnet, loader)
    assert calls == [0.125, 0.81]
    torch.testing.assert_close(sketched.thresholds, exact.thresholds, atol=1e-12, rtol=0)
    torch.testing.assert_close(sketched(test)[1], exact(test)[1], atol=1e-12, rtol=0)


def test_vra_readout_keeps_fit_and_reads_the_clipped_logits() -> None:
    net, rnet, calib, test = _setup(torch.float64)
    score = VRA().fit(rnet, calib)
    energy = score(test)[1][:, 0]
    score.readout = "softmax"
    assert score.is_fit
    probs = score(test)[1]
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(9, dtype=torch.float64))
    low, high = score.thresholds
    feats = torch.tensor(_features(net, test), dtype=torch.float64).clamp(low, high)
    logits = net.fc(feats)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1))
    torch.testing.assert_close(energy, torch.logsumexp(logits, dim=1))
    score.percentile_high = 95.0  # a calibration parameter: the score is unfit
    assert not score.is_fit


def test_vra_parameter_checks() -> None:
    for name, value in [("percentile_high", 101.0), ("percentile_low", -0.5)]:
        with pytest.raises(ParamError, match=rf"`{name}` of VRA must be a number in \[0, 100\]"):
            VRA(**{name: value})
    with pytest.raises(ParamError, match=r"`readout` of VRA must be one of .*got 'max'"):
        VRA(readout="max")
    with pytest.raises(TypeError, match="`percentile_low` of VRA must be float"):
        VRA(percentile_low="10")
    _, rnet, calib, _ = _setup(torch.float32)
    message = r"`percentile_low` must not exceed `percentile_high` \(got percentile_low=95"
    with pytest.raises(ParamError, match=message):
        VRA(percentile_low=95.0).fit(rnet, calib)


def test_vra_save_load(tmp_path: Path) -> None:
    net, rnet, calib, test = _setup(torch.float32)
    score = VRA(percentile_low=5.0, readout="msp").fit(rnet, calib)
    score.save(tmp_path / "vra.pt")
    loaded = scio.load_score(tmp_path / "vra.pt", net)
    assert repr(loaded) == repr(score)
    assert torch.equal(loaded(test)[1], score(test)[1])
