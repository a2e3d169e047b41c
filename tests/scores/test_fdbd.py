"""fDBD against an independent float64 computation of the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor, nn

from scio.recorder import Recorder
from scio.scores import fDBD
from scio.scores.classification.fdbd import fdbd_conformity, fdbd_inverse_gaps


def _features(net: nn.Module, x: Tensor) -> tuple[list[list[float]], list[list[float]]]:
    with torch.no_grad():
        feats = net.flatten(net.pool(net.softplus(net.conv(x))))
        logits = net.fc(feats)
    return feats.double().tolist(), logits.double().tolist()


def _naive(weight: list[list[float]], calib: list[list[float]], test: tuple[list, list]) -> list:
    d = len(calib[0])
    mean = [sum(row[j] for row in calib) / len(calib) for j in range(d)]
    result = []
    for feats, logits in zip(*test, strict=True):
        pred = max(range(len(logits)), key=lambda c: logits[c])
        distances = []
        for c in range(len(logits)):
            if c == pred:
                continue
            gap = math.sqrt(sum((weight[pred][j] - weight[c][j]) ** 2 for j in range(d)))
            distances.append(abs(logits[pred] - logits[c]) / gap)
        norm = math.sqrt(sum((feats[j] - mean[j]) ** 2 for j in range(d)))
        result.append(sum(distances) / len(distances) / norm)
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n_classes", "seed"), [(2, 4), (5, 1)])
def test_fdbd_matches_naive(dtype: torch.dtype, n_classes: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(n_classes)
    net = make_net(dtype=dtype, n_classes=n_classes, seed=seed)
    calib = (3 * torch.randn(20, 1, 4, 4, generator=generator)).to(dtype)
    test = (3 * torch.randn(7, 1, 4, 4, generator=generator)).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    score = fDBD().fit(rnet, calib)
    out, conformity = score(test)
    assert len(set(out.argmax(dim=1).tolist())) > 1  # several predicted classes exercised
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (7, n_classes)
    assert torch.equal(conformity[:, 0], conformity[:, -1])
    weight = net.fc.weight.detach().double().tolist()
    expected = _naive(weight, _features(net, calib)[0], _features(net, test))
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(
        conformity[:, 0].double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=tol
    )


def test_fdbd_hand_made() -> None:
    """Head z = (x1, x2, -x1): boundaries x1 = x2 (gap √2) and x1 = -x1 (gap 2)."""
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    inverse = fdbd_inverse_gaps(weight)
    root2 = math.sqrt(2)
    expected_inverse = torch.tensor(
        [[0, 1 / root2, 0.5], [1 / root2, 0, 1 / root2], [0.5, 1 / root2, 0]], dtype=torch.float64
    )
    torch.testing.assert_close(inverse, expected_inverse)
    features = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    logits = features @ weight.T  # (3, 1, -3): predicted class 0
    center = torch.tensor([0.0, 1.0], dtype=torch.float64)  # ||x - μ|| = 3
    # distance to x1 = x2: 2/√2; to x1 = 0 (boundary 0 vs 2): 6/2 = 3.
    expected = torch.tensor([(2 / root2 + 3) / 2 / 3], dtype=torch.float64)
    torch.testing.assert_close(fdbd_conformity(logits, features, inverse, center), expected)


def test_fdbd_single_class_head() -> None:
    net = make_net(n_classes=1)
    calib = torch.rand(6, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    with pytest.raises(ValueError, match=r"at least 2 classes \(head 'fc' has 1\)"):
        fDBD().fit(rnet, calib)
