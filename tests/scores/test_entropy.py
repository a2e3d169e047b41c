"""Entropy against a naive float64 computation of the negative Shannon entropy."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor, nn

from scio.recorder import Recorder
from scio.scores import Entropy

TOL = {torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}


def identity_net(n_classes: int, dtype: torch.dtype) -> nn.Module:
    """A network whose logits are its inputs (hand-made logits)."""
    net = nn.Linear(n_classes, n_classes, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(n_classes))
    return net.to(dtype).eval()


def naive_negative_entropy(logits: Tensor) -> Tensor:
    """sum_c p_c log p_c, with Python floats (float64) and the max-shifted softmax."""
    result = []
    for row in logits.double().tolist():
        top = max(row)
        weights = [math.exp(z - top) for z in row]
        total = sum(weights)
        result.append(sum((w / total) * math.log(w / total) for w in weights if w > 0))
    return torch.tensor(result, dtype=torch.float64)


HAND_MADE = torch.tensor(
    [
        [0.0, 0.0, 0.0, 0.0],  # uniform: -log 4
        [10.0, 0.0, 0.0, 0.0],
        [1.0, 2.0, 3.0, 4.0],
        [-3.0, 5.0, 5.0, -1.0],
        [200.0, -200.0, 0.0, 1.0],  # probabilities below the float32 range
    ]
)


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_on_hand_made_logits(dtype: torch.dtype) -> None:
    logits = HAND_MADE.to(dtype)
    rnet = Recorder(identity_net(4, dtype), input_data=logits[[0]])
    score = Entropy().fit(rnet, logits, None)
    out, conformity = score(logits)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (5, 4)
    assert torch.equal(conformity[:, 0], conformity[:, 3])
    expected = naive_negative_entropy(logits)
    assert expected[0] == pytest.approx(-math.log(4))
    torch.testing.assert_close(conformity[:, 0].double(), expected, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_on_a_conv_net(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    net = make_net(dtype=dtype)
    calib = torch.rand(10, 1, 4, 4, generator=generator).to(dtype)
    test = torch.rand(7, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    score = Entropy().fit(rnet, calib, None)
    out, conformity = score(test)
    with torch.no_grad():
        expected_out = net(test)
    torch.testing.assert_close(out, expected_out)
    expected = naive_negative_entropy(expected_out)
    torch.testing.assert_close(conformity[:, 1].double(), expected, atol=TOL[dtype], rtol=0)
    assert bool((conformity <= 0).all())
