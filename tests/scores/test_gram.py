"""Gram against a naive float64 loop implementation, plus errors and calibration from batches."""

from __future__ import annotations

import math
import re

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification import gram as gram_module
from scio.scores.classification.gram import Gram, class_nanquantiles, gram_statistics
from scio.utils.enums import EnumWithExplicitSupport

LAYERS = ((1, 2), (1, 4), (1, 5))  # rank 3 (2, 4, 4), rank 1 (8,), rank 1 (3,)


# -- naive reference ---------------------------------------------------------------------------
def _naive_stats(sample: Tensor, max_order: int, separate_diagonal: bool) -> list[float]:
    """Gram statistics of one sample with explicit loops (float64)."""
    x = sample.double()
    rows = x.reshape(x.shape[0], -1) if x.ndim == 3 else x.reshape(1, -1)
    ch, m = rows.shape
    stats: list[float] = []
    for p in range(1, max_order + 1):
        gram = [[0.0] * ch for _ in range(ch)]
        for i in range(ch):
            for j in range(ch):
                total = sum(float(rows[i, t]) ** p * float(rows[j, t]) ** p for t in range(m))
                value = abs(total) ** (1 / p)
                gram[i][j] = value if math.isfinite(value) else math.nan
        if separate_diagonal:
            stats += [gram[i][i] for i in range(ch)]
            stats += [sum(gram[i][j] for j in range(i + 1, ch)) for i in range(ch)]
        else:
            stats += [sum(gram[i][j] for j in range(i, ch)) for i in range(ch)]
    return stats


def _naive_deviation(stats: list[float], low: list[float], high: list[float]) -> float:
    total = 0.0
    for s, lo, hi in zip(stats, low, high, strict=True):
        if s < lo:
            term = (lo - s) / abs(lo) if lo != 0 else math.inf
        elif s > hi:
            term = (s - hi) / abs(hi) if hi != 0 else math.inf
        else:
            term = 0.0
        total += term if math.isfinite(term) else 0.0
    return total


def _naive_gram(
    calib_acts: list[Tensor],
    calib_labels: list[int],
    test_acts: list[Tensor],
    n_classes: int,
    *,
    max_order: int,
    cut_off: float,
    separate_diagonal: bool,
) -> Tensor:
    n_calib, n_test = len(calib_labels), len(test_acts[0])
    total = [[0.0] * n_classes for _ in range(n_test)]
    for calib, test in zip(calib_acts, test_acts, strict=True):
        c_stats = [_naive_stats(s, max_order, separate_diagonal) for s in calib]
        t_stats = [_naive_stats(s, max_order, separate_diagonal) for s in test]
        bounds = {}
        for c in range(n_classes):
            members = [c_stats[i] for i in range(n_calib) if calib_labels[i] == c]
            if not members:
                d = len(c_stats[0])
                bounds[c] = ([math.inf] * d, [-math.inf] * d)
                continue
            values = torch.tensor(members, dtype=torch.float64)
            q = torch.tensor([cut_off, 1 - cut_off], dtype=torch.float64)
            low, high = torch.nanquantile(values, q, dim=0)
            bounds[c] = (low.tolist(), high.tolist())
        expected = sum(
            _naive_deviation(c_stats[i], *bounds[calib_labels[i]]) for i in range(n_calib)
        )
        expected /= n_calib
        for i in range(n_test):
            for c in range(n_classes):
                total[i][c] += _naive_deviation(t_stats[i], *bounds[c]) / expected
    result = torch.tensor(total, dtype=torch.float64)
    return torch.where(result.isnan(), -math.inf, -result)


def _acts(rnet: Recorder, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    with torch.no_grad():
        out = rnet(x)
    return out, [a.detach() for a in rnet.activations.values()]


# -- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("separate_diagonal", "calib_labels", "max_order", "cut_off"),
    [(False, "pred", 3, 0.1), (True, "true", 4, 0.25), (False, "true", 2, 0.4)],
)
def test_gram_matches_naive(
    dtype: torch.dtype, separate_diagonal: bool, calib_labels: str, max_order: int, cut_off: float
) -> None:
    generator = torch.Generator().manual_seed(max_order)
    net = make_net(dtype=dtype, seed=2)  # predicts all three classes on these inputs
    calib = torch.randn(30, 1, 4, 4, generator=generator).to(dtype)
    test = (1.5 * torch.randn(6, 1, 4, 4, generator=generator)).to(dtype)
    labels = torch.randint(0, 2, (30,), generator=generator)  # class 2 absent
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = Gram(
        max_gram_order=max_order,
        cut_off=cut_off,
        separate_diagonal=separate_diagonal,
        calib_labels=calib_labels,
    ).fit(rnet, calib, labels)
    out, conformity = score(test)
    assert conformity.shape == (6, 3)
    assert conformity.dtype == out.dtype == dtype
    assert not conformity.isnan().any()
    with torch.no_grad():
        torch.testing.assert_close(out, net(test))

    calib_out, calib_acts = _acts(rnet, calib)
    _, test_acts = _acts(rnet, test)
    used = calib_out.argmax(1) if calib_labels == "pred" else labels
    expected = _naive_gram(
        [a.double() for a in calib_acts],
        used.tolist(),
        [a.double() for a in test_acts],
        3,
        max_order=max_order,
        cut_off=cut_off,
        separate_diagonal=separate_diagonal,
    )
    tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    torch.testing.assert_close(conformity.double(), expected, atol=tol, rtol=tol)
    if calib_labels == "true":  # absent class: empty range, deviation 0 (reference quirk)
        assert torch.equal(conformity[:, 2], torch.zeros(6, dtype=dtype))


def test_gram_statistics_all_orders_match_loops() -> None:
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(3, 3, 2, 5, generator=generator, dtype=torch.float64)
    for separate in (False, True):
        stats = gram_statistics(acts, 5, separate_diagonal=separate)
        expected = torch.tensor([_naive_stats(a, 5, separate) for a in acts], dtype=torch.float64)
        torch.testing.assert_close(stats, expected)
    # overflow -> NaN statistics instead of inf
    big = torch.full((1, 2, 3), 1e30, dtype=torch.float32)
    assert gram_statistics(big, 2, separate_diagonal=False)[0, 2:].isnan().all()
    # half precision is computed in float32
    assert gram_statistics(acts.half(), 2, separate_diagonal=False).dtype == torch.float32


def test_class_nanquantiles_matches_torch() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(60, 5, generator=generator, dtype=torch.float64)
    values[values > 1.2] = math.nan
    values[:, 4] = math.nan
    labels = torch.randint(0, 4, (60,), generator=generator)
    labels[labels == 2] = 1
    result = class_nanquantiles(values, labels, 4, (0.1, 0.5, 0.9))
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for c in range(4):
        if (labels == c).any():
            expected = torch.nanquantile(values[labels == c], q, dim=0)
        else:
            expected = torch.full((3, 5), math.nan, dtype=torch.float64)
        torch.testing.assert_close(result[:, c], expected, equal_nan=True)


@pytest.mark.parametrize("calib_labels", ["pred", "true"])
def test_gram_batches_equal_tensor(calib_labels: str) -> None:
    generator = torch.Generator().manual_seed(1)
    net = make_net(dtype=torch.float64)
    calib = torch.rand(40, 1, 4, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (40,), generator=generator)
    test = torch.rand(5, 1, 4, 4, generator=generator, dtype=torch.float64)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*LAYERS)
    full = Gram(calib_labels=calib_labels).fit(rnet, calib, labels)
    expected = full(test)[1]
    loader = DataLoader(TensorDataset(calib, labels), batch_size=7)
    batched = Gram(calib_labels=calib_labels).fit(rnet, loader)
    for a, b in zip(full.lows + full.highs, batched.lows + batched.highs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    torch.testing.assert_close(full.expected_deviations, batched.expected_deviations)
    torch.testing.assert_close(batched(test)[1], expected)
    assert not hasattr(batched, "_state")


def _shaped_net(*shape: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Flatten(), nn.Linear(16, 24), nn.Unflatten(1, shape), nn.Flatten(), nn.Linear(24, 3)
        )
    return net.eval()


@pytest.mark.parametrize("shape", [(24,), (4, 6), (2, 3, 4)])
def test_gram_sample_ranks_1_2_3(shape: tuple[int, ...]) -> None:
    net = _shaped_net(*shape)
    calib = torch.rand(20, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 3))
    score = Gram(max_gram_order=3).fit(rnet, calib, None)
    channels = shape[0] if len(shape) == 3 else 1
    assert score.lows[0].shape == (3, 3 * channels)
    _, conformity = score(torch.rand(4, 1, 4, 4))
    assert conformity.shape == (4, 3)
    assert not conformity.isnan().any()


def test_gram_rank_error() -> None:
    net = _shaped_net(2, 3, 2, 2)
    calib = torch.rand(10, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 3))
    msg = "Gram score only supports per-sample activations as 1D, 2D or 3D tensors (got 4D)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        Gram().fit(rnet, calib, None)
    assert not Gram().is_fit


def test_gram_param_checks_and_labels() -> None:
    net = make_net()
    calib = torch.rand(12, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 2))
    for bad in (0.0, 0.5, -0.1, 0.7):
        with pytest.raises(AssertionError):
            Gram(cut_off=bad).fit(rnet, calib, None)
    with pytest.raises(AssertionError):
        Gram(max_gram_order=0).fit(rnet, calib, None)
    with pytest.raises(ValueError, match="is not a valid LabelKind"):
        Gram(calib_labels="wrong").fit(rnet, calib, None)
    score = Gram(calib_labels="true")
    with pytest.raises(ValueError, match="shape"):
        score.fit(rnet, calib, torch.zeros(11, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        score.fit(rnet, calib, torch.zeros(12))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        score.fit(rnet, calib, torch.full((12,), 3))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        score.fit(rnet, calib, torch.full((12,), -1))
    assert not score.is_fit
    # "pred" ignores the labels argument
    Gram().fit(rnet, calib, ...)
    assert repr(Gram()) == (
        "Gram[unfit](act_norm=None, mode='raw', max_gram_order=8, cut_off=0.1, "
        "separate_diagonal=False, calib_labels='pred')"
    )


class _LabelKindPlus(EnumWithExplicitSupport):
    PRED = "pred"
    TRUE = "true"
    NEW = "unexpected"


def test_gram_unsupported_label_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gram_module, "LabelKind", _LabelKindPlus)
    net = make_net()
    calib = torch.rand(12, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 2))
    with pytest.raises(
        ValueError, match=re.escape("Unsupported calib_labels_kind: <_LabelKindPlus")
    ):
        score = Gram()
        score.__dict__["calib_labels"] = "unexpected"  # bypass the check on assignment
        score.fit(rnet, calib, None)


def test_gram_inputs_untouched() -> None:
    net = make_net()
    calib = torch.rand(15, 1, 4, 4)
    test = torch.rand(4, 1, 4, 4)
    calib_copy, test_copy = calib.clone(), test.clone()
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 2), (1, 5))
    score = Gram().fit(rnet, calib, None)
    score(test)
    assert torch.equal(calib, calib_copy)
    assert torch.equal(test, test_copy)
    assert not calib.requires_grad
    assert not test.requires_grad


def test_gram_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small memory bounds (chunks of samples, groups of orders) give the same results."""
    generator = torch.Generator().manual_seed(2)
    net = make_net(dtype=torch.float64, seed=2)
    calib = torch.randn(25, 1, 4, 4, generator=generator, dtype=torch.float64)
    test = torch.randn(9, 1, 4, 4, generator=generator, dtype=torch.float64)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*LAYERS)
    reference = Gram(max_gram_order=5, separate_diagonal=True).fit(rnet, calib, None)
    expected = reference(test)[1]
    monkeypatch.setattr(gram_module, "_MAX_CHUNK_ELEMENTS", 100)
    score = Gram(max_gram_order=5, separate_diagonal=True).fit(rnet, calib, None)
    for a, b in zip(score.lows + score.highs, reference.lows + reference.highs, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(score(test)[1], expected)
