"""Relation against a naive loop over the calibration samples (the relation graph's edges)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import scio
from scio.recorder import Recorder
from scio.scores import Relation
from scio.scores.core.base import ParamError


def _nodes(net: nn.Module, x: Tensor) -> list[tuple[list[float], list[float]]]:
    """(unit features, softmax probabilities) per sample, in float64 from the network."""
    with torch.no_grad():
        feats = net.flatten(net.pool(net.softplus(net.conv(x))))
        logits = net.fc(feats)
    nodes = []
    for row, z in zip(feats.double().tolist(), logits.double().tolist(), strict=True):
        norm = math.sqrt(sum(v * v for v in row) + 1e-10)
        top = max(z)
        e = [math.exp(v - top) for v in z]
        nodes.append(([v / norm for v in row], [v / sum(e) for v in e]))
    return nodes


def _naive(calib: list, test: list, power: float) -> list[float]:
    result = []
    for x, p in test:
        total = 0.0
        for xj, pj in calib:
            dot = max(sum(a * b for a, b in zip(x, xj, strict=True)), 0.0)
            edge = dot * sum(a * b for a, b in zip(p, pj, strict=True))
            if abs(edge) > 0.03:
                total += math.copysign(abs(edge) ** power, edge)
        result.append(total)
    return result


def _setup(dtype: torch.dtype) -> tuple[nn.Module, Recorder, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(7)
    net = make_net(dtype=dtype, n_classes=3, seed=4)
    calib = (2 * torch.rand(40, 1, 4, 4, generator=generator) - 0.5).to(dtype)
    test = torch.cat([torch.rand(5, 1, 4, 4, generator=generator), torch.randn(4, 1, 4, 4)])
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    return net, rnet, calib, test.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("power", [1, 2, 4.5])
def test_relation_matches_naive(dtype: torch.dtype, power: float) -> None:
    net, rnet, calib, test = _setup(dtype)
    score = Relation(pow=power).fit(rnet, calib)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (9, 3)
    assert torch.equal(conformity[:, 0], conformity[:, 2])
    expected = _naive(_nodes(net, calib), _nodes(net, test), power)
    assert len({round(v, 6) for v in expected}) == 9
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(
        conformity[:, 0].double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=tol
    )


def test_relation_pow_keeps_fit_dataloader_and_save_load(tmp_path: Path) -> None:
    net, rnet, calib, test = _setup(torch.float32)
    score = Relation().fit(rnet, calib)
    loader = DataLoader(TensorDataset(calib, torch.zeros(40, dtype=torch.long)), batch_size=7)
    streamed = Relation().fit(rnet, loader)
    torch.testing.assert_close(streamed.bank_features, score.bank_features)
    torch.testing.assert_close(streamed(test)[1], score(test)[1])
    score.pow = 2
    assert score.is_fit
    squared = _naive(_nodes(net, calib), _nodes(net, test), 2)
    expected = torch.tensor(squared, dtype=torch.float64)
    torch.testing.assert_close(score(test)[1][:, 0].double(), expected, atol=1e-5, rtol=1e-5)
    score.save(tmp_path / "relation.pt")
    loaded = scio.load_score(tmp_path / "relation.pt", net)
    assert repr(loaded) == repr(score)
    assert torch.equal(loaded(test)[1], score(test)[1])


def test_relation_parameter_checks() -> None:
    for value in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ParamError, match=r"Parameter `pow` of Relation must be a number"):
            Relation(pow=value)
    with pytest.raises(TypeError, match="`pow` of Relation must be float"):
        Relation(pow="2")
