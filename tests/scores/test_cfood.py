"""CFOOD against a naive loop over the reference samples and grid (OpenOOD's procedure)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import make_net
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import scio
from scio.recorder import Recorder
from scio.scores import CFOOD
from scio.scores.classification.cfood import cfood_grid, cfood_rank
from scio.scores.core.base import ParamError


def _unit_features(net: nn.Module, x: Tensor) -> list[list[float]]:
    with torch.no_grad():
        feats = net.flatten(net.pool(net.softplus(net.conv(x))))
    rows = feats.double().tolist()
    return [[v / (math.sqrt(sum(u * u for u in row)) + 1e-10) for v in row] for row in rows]


def _sq(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True))


def _naive(reference: list, test: list, k: float) -> list[float]:
    """For each grid fraction κ, the fraction of reference rows whose (⌊κn-1⌋+1)-th
    neighbour is at least as far as the query; the first κ where it reaches k."""
    n = len(reference)
    kval = [*np.linspace(0.001, 0.1, 100), *np.linspace(0.105, 0.5, 81)]
    kval += list(np.linspace(0.51, 0.99, 49))
    grid, last = [], None
    for value in kval:
        position = int(value * n - 1)
        if last is None or position > last:
            grid.append((value, position))
            last = position
    radii = []
    for row in reference:
        ordered = sorted(_sq(row, other) for other in reference)  # itself first (0)
        radii.append([ordered[position + 1] for _, position in grid])
    result = []
    for query in test:
        dist = [_sq(query, row) for row in reference]
        kappa = 1.0
        for j, (value, _) in enumerate(grid):
            inside = sum(radii[i][j] >= dist[i] for i in range(n))
            if np.float32(inside / n) >= np.float32(k):
                kappa = value
                break
        result.append(-kappa)
    return result


def _setup(dtype: torch.dtype, n: int = 40) -> tuple[nn.Module, Recorder, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(4)
    net = make_net(dtype=dtype, n_classes=3, seed=1)
    calib = torch.rand(n, 1, 4, 4, generator=generator).to(dtype)
    test = torch.cat([torch.rand(6, 1, 4, 4, generator=generator), 4 * torch.randn(4, 1, 4, 4)])
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    return net, rnet, calib, test.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [0.01, 0.1, 0.3])
def test_cfood_matches_naive(dtype: torch.dtype, k: float) -> None:
    net, rnet, calib, test = _setup(dtype)
    score = CFOOD(alpha=1.0, k=k).fit(rnet, calib)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (10, 3)
    assert torch.equal(conformity[:, 0], conformity[:, 2])
    expected = _naive(_unit_features(net, calib), _unit_features(net, test), k)
    assert len(set(expected)) > 2  # several grid points exercised
    torch.testing.assert_close(
        conformity[:, 0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_cfood_float16_and_subsample_follow_the_seed() -> None:
    net, rnet, calib, test = _setup(torch.float16)
    score = CFOOD(alpha=0.5, k=0.1, seed=3).fit(rnet, calib)
    rows = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:20].sort().values
    feats = _unit_features(net, calib)
    reference = [feats[i] for i in rows.tolist()]
    expected_reference = torch.tensor(reference, dtype=torch.float64)
    torch.testing.assert_close(score.reference.double(), expected_reference, atol=1e-6, rtol=0)
    expected = _naive(reference, _unit_features(net, test), 0.1)
    _, conformity = score(test)
    assert conformity.dtype == torch.float16
    torch.testing.assert_close(
        conformity[:, 0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-3, rtol=0
    )
    other = CFOOD(alpha=0.5, k=0.1, seed=4).fit(rnet, calib)
    assert not torch.equal(other.reference, score.reference)


def test_cfood_dataloader_equals_tensor_and_save_load(tmp_path: Path) -> None:
    net, rnet, calib, test = _setup(torch.float32)
    score = CFOOD(alpha=0.5).fit(rnet, calib)
    loader = DataLoader(TensorDataset(calib, torch.zeros(40, dtype=torch.long)), batch_size=7)
    streamed = CFOOD(alpha=0.5).fit(rnet, loader)
    torch.testing.assert_close(streamed.reference, score.reference)
    torch.testing.assert_close(streamed.radii, score.radii)
    assert torch.equal(streamed(test)[1], score(test)[1])
    score.save(tmp_path / "cfood.pt")
    loaded = scio.load_score(tmp_path / "cfood.pt", net)
    assert repr(loaded) == repr(score) and loaded.rank == score.rank
    assert torch.equal(loaded(test)[1], score(test)[1])


def test_cfood_grid_and_rank() -> None:
    kval, kpos = cfood_grid(1000)
    assert len(kval) == len(kpos) == 230  # every fraction gives a new position at n = 1000
    assert kpos[0] == 0 and kpos[-1] == 989
    kval, kpos = cfood_grid(20)
    assert bool((kpos[1:] > kpos[:-1]).all()) and kpos[-1] + 1 < 20
    assert cfood_rank(0.01, 20) == 1 and cfood_rank(0.1, 20) == 2 and cfood_rank(0.1, 30) == 3
    assert cfood_rank(1.0, 7) == 7


def test_cfood_parameter_checks() -> None:
    with pytest.raises(ParamError, match=r"`alpha` of CFOOD must be a number in \(0, 1\] \(got 0"):
        CFOOD(alpha=0)
    with pytest.raises(ParamError, match=r"`k` of CFOOD must be a number > 0 \(got -0.1\)"):
        CFOOD(k=-0.1)
    with pytest.raises(TypeError, match="`k` of CFOOD must be float"):
        CFOOD(k="0.01")
    with pytest.raises(ParamError, match="`avg_topk` of CFOOD must be False"):
        CFOOD(avg_topk=True)
    _, rnet, calib, _ = _setup(torch.float32)
    with pytest.raises(ParamError, match=r"`k` of CFOOD must be a number in \(0, 1\].*got 1.5"):
        CFOOD(k=1.5).fit(rnet, calib)
    with pytest.raises(ParamError, match=r"`alpha` keeps .* = 1 reference sample"):
        CFOOD(alpha=0.03).fit(rnet, calib)
