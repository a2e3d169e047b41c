"""Quantile summaries: exact path, certified rank error on random and heavy-tailed data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from scio.index import sketch
from scio.index.sketch import QuantileSummary, combine_all, summary_rank
from scio.recorder import Recorder
from scio.scores import ReAct


def _rank_distance(data: np.ndarray, value: float, rank: int) -> int:
    """Distance from ``rank`` to the ranks ``value`` occupies in ``data`` (naive, float64)."""
    below = int(np.sum(data < value))
    upto = int(np.sum(data <= value))
    if below + 1 <= rank <= upto:
        return 0
    return min(abs(rank - (below + 1)), abs(rank - upto))


def _datasets(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "normal": rng.standard_normal(n),
        "cauchy": rng.standard_cauchy(n),
        "pareto": rng.pareto(1.1, n),
        "ties": rng.integers(0, 50, n).astype(np.float64),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
def test_exact_summary_is_torch_quantile(dtype: torch.dtype, q: float) -> None:
    x = torch.randn(1001, generator=torch.Generator().manual_seed(1)).to(dtype)
    summary = QuantileSummary.exact(x)
    assert summary.is_exact
    for interpolation in ("higher", "lower"):
        value, error = summary.quantile(q, interpolation)
        expected = torch.quantile(x.double(), q, interpolation=interpolation).to(dtype)
        assert error == 0
        assert value.dtype == dtype
        assert torch.equal(value, expected)


def test_exact_summaries_combine_exactly() -> None:
    x = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(2)).double()
    parts = [QuantileSummary.exact(part) for part in x.split([0, 100, 1, 199])]
    combined = combine_all(parts)
    assert combined.is_exact and combined.n == 300
    assert torch.equal(combined.values, x.sort().values)
    assert torch.equal(combined.rmin, combined.rmax)
    assert torch.equal(combined.rmin, torch.arange(1, 301))


@pytest.mark.parametrize("name", ["normal", "cauchy", "pareto", "ties"])
def test_streamed_blocks_within_certified_and_documented_error(name: str) -> None:
    data = _datasets(200_000)[name]
    block, size = 2**14, 2**12
    blocks = [
        QuantileSummary.exact(torch.from_numpy(chunk)).prune(size)
        for chunk in np.array_split(data, len(data) // block)
    ]
    summary = combine_all(blocks)
    assert summary.n == len(data) and len(summary) < len(data) // 3
    bound = len(data) / (2 * size) + len(blocks)  # the module docstring's budget
    for q in (0.0, 0.001, 0.05, 0.5, 0.9, 0.95, 0.999, 1.0):
        for interpolation in ("higher", "lower"):
            value, certified = summary.quantile(q, interpolation)
            rank = summary_rank(q, len(data), interpolation)
            assert _rank_distance(data, float(value), rank) <= certified <= bound


@pytest.mark.slow
def test_default_configuration_meets_documented_rank_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default summary size, blocks of 2**15 values: error ≤ 1e-4 · n on heavy tails."""
    data = _datasets(1_000_000)["cauchy"]
    blocks = [
        QuantileSummary.exact(torch.from_numpy(chunk)).prune(sketch.SUMMARY_SIZE)
        for chunk in np.array_split(data, len(data) // 2**15)
    ]
    summary = combine_all(blocks)
    for q in (0.01, 0.5, 0.9, 0.99):
        value, certified = summary.quantile(q, "higher")
        rank = summary_rank(q, len(data), "higher")
        assert certified <= sketch.RANK_ERROR * len(data)
        assert _rank_distance(data, float(value), rank) <= certified


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_compressed_is_exact_then_pruned(dtype: torch.dtype) -> None:
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(4)).to(dtype)
    direct = QuantileSummary.compressed(x, 100)
    reference = QuantileSummary.exact(x).prune(100)
    for field in ("values", "rmin", "rmax"):
        assert torch.equal(getattr(direct, field), getattr(reference, field))
    assert direct.n == reference.n == 10_001 and len(direct) == 101
    small = QuantileSummary.compressed(x[:50], 100)
    assert small.is_exact


def test_recompressing_keeps_valid_bounds() -> None:
    data = _datasets(100_000)["pareto"]
    summary = QuantileSummary.exact(torch.empty(0, dtype=torch.float64))
    for chunk in np.array_split(data, 50):  # a chain of combine + prune (worst case)
        summary = summary.combine(QuantileSummary.exact(torch.from_numpy(chunk))).prune(512)
    assert len(summary) <= 513
    for q in (0.1, 0.5, 0.99):
        value, certified = summary.quantile(q)
        assert _rank_distance(data, float(value), summary_rank(q, len(data), "higher")) <= certified


def test_bad_arguments() -> None:
    summary = QuantileSummary.exact(torch.arange(5.0))
    with pytest.raises(ValueError, match=r"`size` must be a positive integer \(got 0\)"):
        summary.prune(0)
    with pytest.raises(ValueError, match=r"`rank` must lie in \[1, 5\] \(got 6\)"):
        summary.query(6)
    with pytest.raises(ValueError, match="`summaries` must hold at least one summary"):
        combine_all([])


class _Features(nn.Module):
    """Identity backbone + linear head: the calibration inputs are the features."""

    def __init__(self, d: int, n_classes: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Identity()
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@pytest.mark.parametrize("name", ["normal", "cauchy"])
def test_react_sketch_thresholds_within_rank_error(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, d = 10_000, 64
    features = torch.from_numpy(_datasets(n * d)[name].reshape(n, d)).float()
    net = _Features(d).eval()
    batches = [(chunk, None) for chunk in features.split(500)]

    def fit() -> ReAct:
        rnet = Recorder(net, input_data=features[:1])
        rnet.record("backbone")
        score = ReAct(percentile=95.0, symmetric=True)
        score.fit(rnet, batches)
        return score

    exact = fit()
    monkeypatch.setattr(sketch, "EXACT_BUDGET", 2**15)  # 10 compressed blocks
    compressed, pruned = [], []
    original_compressed, original_prune = QuantileSummary.compressed, QuantileSummary.prune

    def spy_compressed(values: torch.Tensor, size: int) -> QuantileSummary:
        compressed.append(values.numel())
        return original_compressed(values, size)

    def spy_prune(self: QuantileSummary, size: int) -> QuantileSummary:
        pruned.append(self.n)
        return original_prune(self, size)

    monkeypatch.setattr(QuantileSummary, "compressed", staticmethod(spy_compressed))
    monkeypatch.setattr(QuantileSummary, "prune", spy_prune)
    sketched = fit()
    # a block every 2 batches (beyond the budget), and re-compressions of the blocks
    assert compressed == [2 * 500 * d] * 10
    assert pruned and min(pruned) > 2 * 500 * d
    values = features.double().numpy().reshape(-1)
    total = len(values)
    for attr, q, interpolation in (("clip_high", 0.95, "higher"), ("clip_low", 0.05, "lower")):
        threshold = float(getattr(sketched, attr)[0])
        rank = summary_rank(q, total, interpolation)
        assert _rank_distance(values, threshold, rank) <= sketch.RANK_ERROR * total
        assert _rank_distance(values, float(getattr(exact, attr)[0]), rank) == 0
