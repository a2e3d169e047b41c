"""NNGuide against an independent float64 computation of the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores import NNGuide
from scio.scores.classification.nnguide import nnguide_conformity, nnguide_keep


def _features(net: torch.nn.Module, x: Tensor) -> tuple[list[list[float]], list[list[float]]]:
    with torch.no_grad():
        feats = net.flatten(net.pool(net.softplus(net.conv(x))))
        logits = net.fc(feats)
    return feats.double().tolist(), logits.double().tolist()


def _lse(row: list[float]) -> float:
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def _unit(row: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in row))
    return [v / norm for v in row]


def _naive(calib: tuple[list, list], test: tuple[list, list], k: int, keep: list[int]) -> list:
    bank = [[_lse(calib[1][i]) * v for v in _unit(calib[0][i])] for i in keep]
    result = []
    for feats, logits in zip(*test, strict=True):
        x = _unit(feats)
        sims = sorted(
            (sum(a * b for a, b in zip(x, b_j, strict=True)) for b_j in bank), reverse=True
        )
        result.append(_lse(logits) * sum(sims[:k]) / k)
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("k", "fraction"), [(1, 1.0), (4, 1.0), (3, 0.4), (25, 1.0)])
def test_nnguide_matches_naive(dtype: torch.dtype, k: int, fraction: float) -> None:
    generator = torch.Generator().manual_seed(k)
    net = make_net(dtype=dtype, seed=1)
    calib = torch.rand(25, 1, 4, 4, generator=generator).to(dtype)
    test = torch.rand(6, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    score = NNGuide(k=k, bank_fraction=fraction).fit(rnet, calib)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (6, 3)
    assert torch.equal(conformity[:, 0], conformity[:, 1])
    # Systematic subsample: position i is kept iff floor((i + 1) f) > floor(i f).
    keep = [i for i in range(25) if math.floor((i + 1) * fraction) > math.floor(i * fraction)]
    assert score.index.ntotal == len(keep) == math.floor(25 * fraction)
    expected = torch.tensor(
        _naive(_features(net, calib), _features(net, test), k, keep), dtype=torch.float64
    )
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(conformity[:, 0].double(), expected.double(), atol=tol, rtol=tol)
    # Batching does not change the subsample.
    loader = DataLoader(TensorDataset(calib), batch_size=4)
    streamed = NNGuide(k=k, bank_fraction=fraction).fit(rnet, [b for (b,) in loader])
    torch.testing.assert_close(streamed(test)[1], conformity, atol=tol, rtol=tol)


def test_nnguide_hand_made() -> None:
    """Two bank entries along the axes, scaled by their energies; query on the diagonal."""
    bank = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    features = torch.tensor([[1.0, 1.0], [3.0, 0.0]], dtype=torch.float64)
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    energy = torch.tensor([math.log(2), 1 + math.log(2)], dtype=torch.float64)
    expected_top1 = energy * torch.tensor([2 / math.sqrt(2), 2.0], dtype=torch.float64)
    torch.testing.assert_close(nnguide_conformity(features, logits, bank, 1), expected_top1)
    expected_top2 = energy * torch.tensor([1.5 / math.sqrt(2), 1.0], dtype=torch.float64)
    torch.testing.assert_close(nnguide_conformity(features, logits, bank, 2), expected_top2)
    assert nnguide_keep(0, 10, 0.3).nonzero().squeeze(1).tolist() == [3, 6, 9]
    assert nnguide_keep(4, 6, 0.3).nonzero().squeeze(1).tolist() == [2, 5]  # positions 6, 9


def test_nnguide_bad_params() -> None:
    net = make_net()
    calib = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    # checked at construction (docs/errors.md)
    with pytest.raises(ValueError, match=r"`bank_fraction` of NNGuide .* in \(0, 1\] \(got 0\)"):
        NNGuide(bank_fraction=0)
    with pytest.raises(ValueError, match=r"`bank_fraction` of NNGuide .* \(0, 1\] \(got 1.5\)"):
        NNGuide(bank_fraction=1.5)
    with pytest.raises(ValueError, match=r"`k` must satisfy 0 < k <= n_calib = 10"):
        NNGuide(k=11).fit(rnet, calib)
    with pytest.raises(ValueError, match=r"`k` must satisfy 0 < k <= 5, the guide bank size"):
        NNGuide(k=6, bank_fraction=0.5).fit(rnet, calib)
    with pytest.raises(ValueError, match=r"keeps no calibration sample"):
        NNGuide(k=1, bank_fraction=0.05).fit(rnet, calib)
