"""Mahalanobis calibration: memory estimate before a huge covariance, chunked float64 sums."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from scio import scores
from scio.recorder import Recorder
from scio.scores.classification import deepmahalanobis
from scio.scores.utils import covariance


class _WideConv(nn.Module):
    """3×32×32 input → conv to 48 channels (a 48×32×32 map: 49,152 features) → linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 48, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.conv(x))))


@pytest.mark.parametrize("cls", [scores.DeepMahalanobis, scores.RelativeMahalanobis])
def test_huge_covariance_is_refused_before_allocation(cls: type) -> None:
    net = _WideConv().eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rnet = Recorder(net, input_data=x[:1])
    rnet.record("conv")
    score = cls()
    with pytest.raises(MemoryError) as info:  # 49,152² float64: ~90 GiB, more than any host here
        score.fit(rnet, x, torch.tensor([0, 1, 2, 3]))
    message = str(info.value)
    for part in (
        cls.__name__,
        "(1, 1)",
        "49152 features",
        "(48, 32, 32)",
        "GiB",
        "pooled layer",
    ):
        assert part in message
    assert not score.is_fit


def test_pooled_layer_fits_without_warning() -> None:
    net = _WideConv().eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rnet = Recorder(net, input_data=x[:1])
    rnet.record("pool")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="Singular covariance")
        scores.DeepMahalanobis().fit(rnet, x, torch.arange(8) % 4)


def test_large_covariance_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(covariance, "_WARN_BYTES", 1000)
    net = _WideConv().eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rnet = Recorder(net, input_data=x[:1])
    rnet.record("pool")
    with pytest.warns(UserWarning, match=r"48 features per sample .* GiB .*pooled layer"):
        scores.DeepMahalanobis().fit(rnet, x, torch.arange(8) % 4)


def test_chunked_accumulation_matches_naive_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 5 rows inside each batch: same class means and covariance as a naive
    float64 computation (and as unchunked calibration)."""
    net = _WideConv().eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 32, 32, generator=generator)
    y = torch.arange(64) % 4
    rnet = Recorder(net, input_data=x[:1])
    rnet.record("fc")
    whole = scores.DeepMahalanobis().fit(rnet, x, y)
    monkeypatch.setattr(deepmahalanobis, "_CHUNK_ELEMENTS", 5 * 4)
    chunked = scores.DeepMahalanobis().fit(rnet, [(x[:30], y[:30]), (x[30:], y[30:])])
    with torch.no_grad():
        z = net(x).double()
    means = torch.stack([z[y == c].mean(0) for c in range(4)])
    residues = z - means[y]
    cov = residues.T @ residues / (len(z) - 1)
    for score in (whole, chunked):
        torch.testing.assert_close(score.means[0], means)
        torch.testing.assert_close(score.precisions[0], torch.linalg.inv(cov), rtol=1e-6, atol=1e-6)
