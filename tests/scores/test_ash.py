"""ASH against a naive float64 implementation of the three variants, and its checks."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from tests.conftest import DTYPES, TinyConvNet, make_net
from torch import Tensor, nn

from scio.recorder import Recorder
from scio.scores import ASH
from scio.scores.classification.ash import ash_shape

TOL = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}


class HeadNet(nn.Module):
    """features = relu(x) (recorded layer (1, 1)), logits = fc(features)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.body = nn.ReLU()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


def conv_features(net: TinyConvNet, x: Tensor) -> Tensor:
    """The head input of TinyConvNet, by explicit module calls (float64 copy of the result)."""
    with torch.no_grad():
        return net.flatten(net.pool(net.softplus(net.conv(x)))).double()


def naive_readout(logits: list[float], kind: str) -> list[float]:
    top = max(logits)
    weights = [math.exp(z - top) for z in logits]
    if kind == "energy":
        return [top + math.log(sum(weights))]
    if kind == "logit":
        return logits
    probs = [w / sum(weights) for w in weights]
    return [max(probs)] if kind == "msp" else probs


def naive_linear(h: list[float], weight: Tensor, bias: Tensor) -> list[float]:
    rows, b = weight.double().tolist(), bias.double().tolist()
    return [sum(w * x for w, x in zip(row, h, strict=True)) + bc for row, bc in zip(rows, b)]


def naive_ash(h: list[float], percentile: float, variant: str) -> list[float]:
    d = len(h)
    n_pruned = round(d * percentile / 100)
    kept = set(sorted(range(d), key=lambda j: -h[j])[: max(d - n_pruned, 1)])
    s1, s2 = sum(h), sum(h[j] for j in kept)
    if variant == "p":
        return [h[j] if j in kept else 0.0 for j in range(d)]
    if variant == "b":
        return [s1 / len(kept) if j in kept else 0.0 for j in range(d)]
    return [h[j] * math.exp(s1 / s2) if j in kept else 0.0 for j in range(d)]


def naive_score(
    features: Tensor,
    weight: Tensor,
    bias: Tensor,
    shape: Callable[[list[float]], list[float]],
    kind: str,
) -> Tensor:
    rows = [naive_readout(naive_linear(shape(h), weight, bias), kind) for h in features.tolist()]
    return torch.tensor(rows, dtype=torch.float64)


def test_ash_variants_on_hand_made_features() -> None:
    features = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 5.0, 1.0, 0.0]], dtype=torch.float64)
    expected = {
        "p": [[0.0, 0.0, 3.0, 4.0], [0.0, 5.0, 1.0, 0.0]],
        "b": [[0.0, 0.0, 5.0, 5.0], [0.0, 3.0, 3.0, 0.0]],
        "s": [
            [0.0, 0.0, 3 * math.exp(10 / 7), 4 * math.exp(10 / 7)],
            [0.0, 5 * math.e, math.e, 0.0],
        ],
    }
    for variant, values in expected.items():
        shaped = ash_shape(features, 50.0, variant)
        torch.testing.assert_close(shaped, torch.tensor(values, dtype=torch.float64))
    # percentile 99 on 4 values prunes all but one (at least one value is kept)
    torch.testing.assert_close(
        ash_shape(features, 99.0, "p")[0], torch.tensor([0, 0, 0, 4.0]).double()
    )


@pytest.mark.parametrize("variant", ["p", "b", "s"])
@pytest.mark.parametrize("readout", ["energy", "softmax", "msp", "logit"])
def test_ash_head_net_matches_naive(variant: str, readout: str) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    bias = torch.randn(3, generator=generator, dtype=torch.float64)
    net = HeadNet(weight, bias).double().eval()
    calib = torch.rand(5, 6, generator=generator, dtype=torch.float64)
    test = torch.rand(7, 6, generator=generator, dtype=torch.float64)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 1))
    score = ASH(percentile=40.0, variant=variant, readout=readout).fit(rnet, calib, None)
    assert score.head_name == "fc"
    out, conformity = score(test)
    torch.testing.assert_close(out, net(test).detach())
    expected = naive_score(
        test, net.fc.weight, net.fc.bias, lambda h: naive_ash(h, 40.0, variant), readout
    )
    torch.testing.assert_close(conformity, expected.expand(7, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["p", "b", "s"])
def test_ash_conv_net_matches_naive(dtype: torch.dtype, variant: str) -> None:
    generator = torch.Generator().manual_seed(1)
    net = make_net(dtype=dtype)
    calib = torch.rand(12, 1, 4, 4, generator=generator).to(dtype)
    test = torch.rand(6, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    score = ASH(variant=variant).fit(rnet, calib, None)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    with torch.no_grad():
        torch.testing.assert_close(out, net(test))
    features = conv_features(net, test)
    expected = naive_score(
        features, net.fc.weight, net.fc.bias, lambda h: naive_ash(h, 65.0, variant), "energy"
    )
    tol = TOL[dtype]
    torch.testing.assert_close(conformity[:, :1].double(), expected, rtol=tol, atol=tol)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_ash_parameter_checks() -> None:
    for bad in (0.0, 100.0, -5.0, 150.0, math.nan, 0):
        with pytest.raises(ValueError, match=r"`percentile` must lie in \(0, 100\)"):
            ASH(percentile=bad)
    for bad in (True, "65", None):
        with pytest.raises(TypeError, match="`percentile`"):
            ASH(percentile=bad)
    with pytest.raises(ValueError, match=r"`variant` must be one of \('p', 'b', 's'\) \(got 'x'\)"):
        ASH(variant="x")
    with pytest.raises(ValueError, match=r"`readout` must be one of .* \(got 'entropy'\)"):
        ASH(readout="entropy")
    score = ASH()
    with pytest.raises(ValueError, match="`percentile` must lie in"):
        score.percentile = 100
    net = make_net()
    calib = torch.rand(4, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 5))  # the logits: no linear head after them
    with pytest.raises(ValueError, match="No linear head follows the recorded layer"):
        ASH().fit(rnet, calib, None)
    assert repr(ASH(variant="b")).startswith("ASH[unfit](")
