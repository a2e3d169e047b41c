"""NCI against an independent float64 computation of the authors' (OpenOOD's) formula and of
the cosine variant."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor, nn

from scio.recorder import Recorder
from scio.scores import NCI
from scio.scores.classification.nci import nci_conformity


def _features(net: nn.Module, x: Tensor) -> tuple[list[list[float]], list[list[float]]]:
    with torch.no_grad():
        feats = net.flatten(net.pool(net.softplus(net.conv(x))))
        logits = net.fc(feats)
    return feats.double().tolist(), logits.double().tolist()


def _naive(
    weight: list, calib: list, test: tuple[list, list], alpha: float, proximity: str
) -> list:
    d = len(calib[0])
    mean = [sum(row[j] for row in calib) / len(calib) for j in range(d)]
    result = []
    for feats, logits in zip(*test, strict=True):
        w = weight[max(range(len(logits)), key=lambda c: logits[c])]
        centred = [feats[j] - mean[j] for j in range(d)]
        dot = sum(w[j] * centred[j] for j in range(d))
        value = dot / math.sqrt(sum(v * v for v in centred))
        if proximity == "cosine":
            value /= math.sqrt(sum(v * v for v in w))
        result.append(value + alpha * sum(abs(v) for v in feats))
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.01, 1.0])
@pytest.mark.parametrize("proximity", ["projection", "cosine"])
def test_nci_matches_naive(dtype: torch.dtype, alpha: float, proximity: str) -> None:
    generator = torch.Generator().manual_seed(5)
    net = make_net(dtype=dtype, n_classes=4, seed=1)
    calib = (3 * torch.randn(20, 1, 4, 4, generator=generator)).to(dtype)
    test = (3 * torch.randn(7, 1, 4, 4, generator=generator)).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    score = NCI(alpha=alpha, proximity=proximity).fit(rnet, calib)
    out, conformity = score(test)
    assert len(set(out.argmax(dim=1).tolist())) > 1  # several predicted classes exercised
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (7, 4)
    assert torch.equal(conformity[:, 0], conformity[:, 3])
    weight = net.fc.weight.detach().double().tolist()
    expected = _naive(weight, _features(net, calib)[0], _features(net, test), alpha, proximity)
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(
        conformity[:, 0].double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=tol
    )


def test_nci_hand_made_and_alpha_keeps_fit() -> None:
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    features = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    logits = features @ weight.T  # predictions 0, 1
    center = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # centred (1, 0) vs w_0 = (1, 0): cos 1; centred (0, 2) vs w_1 = (0, 2): cos 1.
    # Projections <x - μ, w> / ||x - μ||: 1 and 4 / 2 = 2 (the authors' default).
    ones = torch.ones(2, dtype=torch.float64)
    projection = torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(nci_conformity(logits, features, weight, center, 0.0), projection)
    torch.testing.assert_close(
        nci_conformity(logits, features, weight, center, 0.0, "cosine"), ones
    )
    torch.testing.assert_close(
        nci_conformity(logits, features, weight, center, 0.5),
        projection + 0.5 * torch.tensor([3.0, 4.0], dtype=torch.float64),
    )
    off = torch.tensor([[1.0, 2.0]], dtype=torch.float64)  # centred (0, 1), predicted 1
    torch.testing.assert_close(
        nci_conformity(off @ weight.T, off, weight, center, 0.0, "cosine"), ones[:1]
    )
    torch.testing.assert_close(
        nci_conformity(off @ weight.T, off, weight, center, 0.0), 2 * ones[:1]
    )
    net = make_net()
    calib = torch.rand(6, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    score = NCI().fit(rnet, calib)
    assert score.alpha == 1e-4 and score.proximity == "projection"  # OpenOOD's defaults
    score.alpha = 0.1  # inference-only parameters: the score stays fit
    score.proximity = "cosine"
    assert score.is_fit and "proximity='cosine'" in repr(score)
    with pytest.raises(ValueError, match=r"`proximity` must be one of .*got 'cos'"):
        score.proximity = "cos"
    score.alpha = -0.5
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number >= 0 \(got -0.5\)"):
        score(calib)
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number >= 0 \(got -1\)"):
        NCI(alpha=-1).fit(rnet, calib)
