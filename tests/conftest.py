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


# Heaviest tests of the developer loop (`pytest -m "not slow"`), measured with --durations on
# a loaded 2-core machine: marked slow here so the loop stays short; CI runs them all.
_SLOW_PREFIXES = (
    # spawn 2 gloo processes each (5-11 s); test_explicit_process_group stays in the loop
    "tests/distributed/test_distributed_fit.py::test_every_algorithm_matches_single_process",
    "tests/distributed/test_distributed_fit.py::test_fit_jointly_distributed_with_an_empty",
    "tests/distributed/test_distributed_fit.py::test_mismatched_ranks_raise_on_every_rank",
    "tests/scores/test_chunking.py::test_odds_chunked_equals_one_shot",  # 4-5 s each
    "tests/models/test_fmnist.py::test_fmnist_",  # full test-set accuracy checks (2 s each)
    "tests/models/test_models.py::test_reproduces_reference",
)
# The functional grid keeps float32 in the fast loop; float16/float64 run in the full suite.
_SLOW_GRID = ("tests/scores/test_functional_grid.py::", ("-float16]", "-float64]"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the heavy tests listed above as slow."""
    grid_prefix, grid_suffixes = _SLOW_GRID
    for item in items:
        node = item.nodeid
        heavy = node.startswith(_SLOW_PREFIXES) or (
            node.startswith(grid_prefix) and node.endswith(grid_suffixes)
        )
        if heavy:
            item.add_marker(pytest.mark.slow)
