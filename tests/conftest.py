"""Shared fixtures: small deterministic networks and data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

DTYPES = (torch.float16, torch.float32, torch.float64)


class TinyConvNet(nn.Module):
    """conv -> softplus -> maxpool -> flatten -> fc (declared in another order on purpose).

    Layer ids: (1, 1) conv, (1, 2) softplus, (1, 3) pool, (1, 4) flatten, (1, 5) fc.
    """

    def __init__(self, n_channels: int = 1, size: int = 4, n_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_channels, n_channels + 1, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear((n_channels + 1) * (size // 2) ** 2, n_classes)
        self.softplus = nn.Softplus(beta=0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.softplus(self.conv(x)))))


def make_net(
    *,
    n_channels: int = 1,
    size: int = 4,
    n_classes: int = 3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> TinyConvNet:
    """A TinyConvNet with N(0, 1) parameters drawn from a seeded generator."""
    net = TinyConvNet(n_channels, size, n_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return net.to(dtype).eval()


@pytest.fixture
def net() -> TinyConvNet:
    return make_net()


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)
