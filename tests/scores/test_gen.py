"""GEN against a naive float64 computation of the generalized entropy, and its checks."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from tests.scores.test_entropy import HAND_MADE, identity_net
from torch import Tensor

from scio.recorder import Recorder
from scio.scores import GEN
from scio.scores.classification.gen import generalized_entropy

TOL = {torch.float16: 3e-3, torch.float32: 2e-5, torch.float64: 1e-12}


def naive_gen(logits: Tensor, gamma: float, m: int | None) -> Tensor:
    """-sum over the M largest p_j of p_j^γ (1 - p_j)^γ, with exact rational arithmetic
    on float64 probabilities (1 - p_top is computed as the sum of the other p's)."""
    result = []
    for row in logits.double().tolist():
        top = max(row)
        weights = [math.exp(z - top) for z in row]
        total = sum(weights)
        probs = sorted((w / total for w in weights), reverse=True)
        rest = [sum(probs[:i] + probs[i + 1 :]) for i in range(len(probs))]
        kept = range(len(probs) if m is None else m)
        result.append(-sum(probs[i] ** gamma * rest[i] ** gamma for i in kept))
    return torch.tensor(result, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("gamma", "m"), [(0.1, None), (0.1, 2), (0.5, 1), (0.9, 4)])
def test_gen_on_hand_made_logits(dtype: torch.dtype, gamma: float, m: int | None) -> None:
    logits = HAND_MADE.to(dtype)
    rnet = Recorder(identity_net(4, dtype), input_data=logits[[0]])
    score = GEN(gamma=gamma, M=m).fit(rnet, logits, None)
    out, conformity = score(logits)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (5, 4)
    expected = naive_gen(logits, gamma, m)
    torch.testing.assert_close(conformity[:, 2].double(), expected, atol=TOL[dtype], rtol=0)


def test_gen_of_uniform_and_confident_predictions() -> None:
    uniform = torch.zeros(1, 5)
    # every term is (1/5)^γ (4/5)^γ
    expected = 5 * (0.2 * 0.8) ** 0.1
    assert float(generalized_entropy(uniform, 0.1)) == pytest.approx(expected, rel=1e-6)
    # 1 - p_top = 2e-20 is far below float32 rounding: the term must still be exact
    confident = torch.tensor([[0.0, -math.log(1e20) + 0.0, -math.log(1e20)]])
    value = float(generalized_entropy(confident, 0.5))
    assert value == pytest.approx(float(-naive_gen(confident, 0.5, None)[0]), rel=1e-5)
    assert value > 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
def test_gen_on_a_conv_net(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(4)
    net = make_net(dtype=dtype)
    calib = torch.rand(10, 1, 4, 4, generator=generator).to(dtype)
    test = torch.rand(7, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    out, conformity = GEN().fit(rnet, calib, None)(test)
    with torch.no_grad():
        torch.testing.assert_close(out, net(test))
    expected = naive_gen(out, 0.1, None)
    torch.testing.assert_close(conformity[:, 0].double(), expected, atol=TOL[dtype], rtol=0)


def test_gen_parameter_checks() -> None:
    for bad in (0.0, 1.0, -0.5, 2.0, math.nan):
        with pytest.raises(ValueError, match=r"`gamma` must lie in \(0, 1\)"):
            GEN(gamma=bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"`M` must be None \(every class\) or an integer"):
            GEN(M=bad)
    for name, bad in (("gamma", "0.1"), ("gamma", True), ("M", 1.5), ("M", True), ("M", "2")):
        with pytest.raises(TypeError, match=f"`{name}`"):
            GEN(**{name: bad})
    score = GEN(M=2)
    with pytest.raises(ValueError, match="`gamma` must lie in"):
        score.gamma = 1.5
    logits = HAND_MADE
    rnet = Recorder(identity_net(4, torch.float32), input_data=logits[[0]])
    score = GEN(M=5).fit(rnet, logits, None)
    with pytest.raises(ValueError, match=r"`M` must not exceed the number of classes 4 \(got M=5"):
        score(logits)
    assert repr(GEN(M=3)) == "GEN[unfit](act_norm=None, mode='raw', gamma=0.1, M=3)"
