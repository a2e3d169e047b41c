"""SCALE against a naive float64 implementation, and its checks."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from tests.scores.test_ash import TOL, HeadNet, conv_features, naive_score

from scio.recorder import Recorder
from scio.scores import ASH, SCALE


def naive_scale(h: list[float], percentile: float) -> list[float]:
    d = len(h)
    k = max(d - round(d * percentile / 100), 1)
    s2 = sum(sorted(h, reverse=True)[:k])
    return [x * math.exp(sum(h) / s2) for x in h]


@pytest.mark.parametrize("readout", ["energy", "softmax", "msp"])
@pytest.mark.parametrize("percentile", [10.0, 65.0, 99.0])
def test_scale_head_net_matches_naive(readout: str, percentile: float) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    net = HeadNet(weight, bias).double().eval()
    calib = torch.rand(5, 7, generator=generator, dtype=torch.float64)
    test = torch.rand(6, 7, generator=generator, dtype=torch.float64)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 1))
    score = SCALE(percentile=percentile, readout=readout).fit(rnet, calib, None)
    out, conformity = score(test)
    torch.testing.assert_close(out, net(test).detach())
    expected = naive_score(
        test, net.fc.weight, net.fc.bias, lambda h: naive_scale(h, percentile), readout
    )
    torch.testing.assert_close(conformity, expected.expand(6, 4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_conv_net_matches_naive(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    net = make_net(dtype=dtype)
    calib = torch.rand(12, 1, 4, 4, generator=generator).to(dtype)
    test = torch.rand(6, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    out, conformity = SCALE().fit(rnet, calib, None)(test)
    assert out.dtype == conformity.dtype == dtype
    with torch.no_grad():
        torch.testing.assert_close(out, net(test))
    features = conv_features(net, test)
    expected = naive_score(
        features, net.fc.weight, net.fc.bias, lambda h: naive_scale(h, 65.0), "energy"
    )
    tol = TOL[dtype]
    torch.testing.assert_close(conformity[:, :1].double(), expected, rtol=tol, atol=tol)


def test_scale_equals_ash_s_without_pruning_on_kept_features() -> None:
    """With a percentile that keeps every feature the scale is exp(1) for both."""
    generator = torch.Generator().manual_seed(3)
    net = HeadNet(torch.randn(2, 3, generator=generator), torch.zeros(2)).double().eval()
    x = torch.rand(4, 3, generator=generator, dtype=torch.float64)
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record((1, 1))
    _, scale = SCALE(percentile=1.0, readout="logit").fit(rnet, x, None)(x)
    _, ash = ASH(percentile=1.0, variant="s", readout="logit").fit(rnet, x, None)(x)
    torch.testing.assert_close(scale, ash)
    torch.testing.assert_close(scale, net(x).detach() * math.e)


def test_scale_parameter_checks() -> None:
    for bad in (0.0, 100.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"`percentile` must lie in \(0, 100\)"):
            SCALE(percentile=bad)
    with pytest.raises(TypeError, match="`percentile`"):
        SCALE(percentile=None)
    with pytest.raises(ValueError, match=r"`readout` must be one of"):
        SCALE(readout="Energy")
    score = SCALE()
    with pytest.raises(ValueError, match=r"`readout` must be one of"):
        score.readout = "max"
