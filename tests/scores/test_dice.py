"""DICE against a naive float64 implementation, streaming, no weight mutation, checks."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from tests.scores.test_ash import TOL, HeadNet, conv_features, naive_readout
from torch import Tensor
from torch.utils.data import DataLoader

from scio.recorder import Recorder
from scio.scores import DICE, Energy
from scio.scores.classification.dice import dice_mask


def naive_dice(
    calib_features: Tensor, features: Tensor, weight: Tensor, bias: Tensor, p: float, kind: str
) -> tuple[list[list[bool]], Tensor]:
    """Mask of the top (100 - p) % contributions W_cj · mean_j, and the read-out of the
    sparsified head, with Python loops."""
    rows = calib_features.double().tolist()
    d = len(rows[0])
    mean = [sum(r[j] for r in rows) / len(rows) for j in range(d)]
    w, b = weight.double().tolist(), bias.double().tolist()
    n_classes = len(w)
    contributions = sorted(
        ((w[c][j] * mean[j], c, j) for c in range(n_classes) for j in range(d)), reverse=True
    )
    k = max(round(n_classes * d * (100 - p) / 100), 1)
    mask = [[False] * d for _ in range(n_classes)]
    for _, c, j in contributions[:k]:
        mask[c][j] = True
    result = []
    for h in features.double().tolist():
        logits = [
            sum(w[c][j] * h[j] for j in range(d) if mask[c][j]) + b[c] for c in range(n_classes)
        ]
        result.append(naive_readout(logits, kind))
    return mask, torch.tensor(result, dtype=torch.float64)


@pytest.mark.parametrize("readout", ["energy", "softmax", "logit"])
@pytest.mark.parametrize("p", [0.0, 50.0, 90.0, 99.9])
def test_dice_head_net_matches_naive(readout: str, p: float) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    net = HeadNet(weight, torch.randn(3, generator=generator)).double().eval()
    calib = torch.rand(9, 5, generator=generator, dtype=torch.float64)
    test = torch.rand(6, 5, generator=generator, dtype=torch.float64)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 1))
    score = DICE(p=p, readout=readout).fit(rnet, calib, None)
    out, conformity = score(test)
    torch.testing.assert_close(out, net(test).detach())
    mask, expected = naive_dice(calib, test, net.fc.weight, net.fc.bias, p, readout)
    assert score.mask.tolist() == mask
    torch.testing.assert_close(score.feature_mean, calib.mean(dim=0))
    torch.testing.assert_close(conformity, expected.expand(6, 3), rtol=1e-12, atol=1e-12)
    if p == 0.0:  # nothing pruned: the plain head
        assert bool(score.mask.all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_dice_conv_net_matches_naive_and_keeps_the_weights(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    net = make_net(dtype=dtype)
    calib = torch.rand(20, 1, 4, 4, generator=generator).to(dtype)
    test = torch.rand(6, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    before = net.fc.weight.detach().clone()
    score = DICE().fit(rnet, calib, None)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert torch.equal(net.fc.weight, before)
    with torch.no_grad():
        torch.testing.assert_close(out, net(test))
    mask, expected = naive_dice(
        conv_features(net, calib),
        conv_features(net, test),
        net.fc.weight,
        net.fc.bias,
        90.0,
        "energy",
    )
    assert score.mask.tolist() == mask
    assert int(score.mask.sum()) == round(0.1 * 3 * 8)
    tol = TOL[dtype]
    torch.testing.assert_close(conformity[:, :1].double(), expected, rtol=tol, atol=tol)


def test_dice_streams_a_running_mean() -> None:
    generator = torch.Generator().manual_seed(2)
    net = make_net(dtype=torch.float64)
    calib = torch.rand(23, 1, 4, 4, generator=generator, dtype=torch.float64)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    whole = DICE(p=70.0).fit(rnet, calib, None)
    streamed = DICE(p=70.0).fit(rnet, DataLoader(calib, batch_size=5))
    torch.testing.assert_close(streamed.feature_mean, whole.feature_mean, rtol=1e-14, atol=0)
    assert torch.equal(streamed.mask, whole.mask)


def test_dice_mask_keeps_the_largest_signed_contributions() -> None:
    contributions = torch.tensor([[3.0, -5.0, 0.5], [1.0, 2.0, -0.1]])
    assert dice_mask(contributions, 50.0).tolist() == [[True, False, False], [True, True, False]]
    assert dice_mask(contributions, 99.0).tolist() == [[True, False, False], [False] * 3]


def test_dice_parameter_checks() -> None:
    for bad in (100.0, -1.0, 150.0, math.nan, 100):
        with pytest.raises(ValueError, match=r"`p` must lie in \[0, 100\)"):
            DICE(p=bad)
    for bad in (True, "90"):
        with pytest.raises(TypeError, match="`p`"):
            DICE(p=bad)
    with pytest.raises(ValueError, match=r"`readout` must be one of"):
        DICE(readout="entropy")
    assert DICE(p=0).p == 0


def test_dice_without_sparsity_is_the_energy_score() -> None:
    generator = torch.Generator().manual_seed(5)
    net = make_net()
    calib = torch.rand(10, 1, 4, 4, generator=generator)
    test = torch.rand(6, 1, 4, 4, generator=generator)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    _, dice = DICE(p=0.0).fit(rnet, calib, None)(test)
    _, energy = Energy().fit(rnet, calib, None)(test)
    torch.testing.assert_close(dice, energy, rtol=1e-5, atol=1e-5)
