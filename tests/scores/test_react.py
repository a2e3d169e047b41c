"""ReAct against a naive computation (sorted lists for quantiles, hand-written forward)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import DTYPES, TinyConvNet, make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification.react import ReAct
from scio.scores.joint.fit import fit_jointly

LAYER_NAMES = {(1, 1): "conv", (1, 2): "softplus", (1, 3): "pool", (1, 4): "flatten", (1, 5): "fc"}


def manual_forward(
    net: TinyConvNet, x: Tensor, clip: dict[str, tuple[float | None, float]] | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Float64 forward of TinyConvNet, layer by layer, optionally clipping named layers."""
    clip = clip or {}
    acts = {}
    h = x.double()
    bias = net.conv.bias
    assert bias is not None
    steps = [
        (
            "conv",
            lambda t: F.conv2d(t, net.conv.weight.double(), bias.double(), padding=1),
        ),
        ("softplus", lambda t: F.softplus(t, beta=0.4)),
        ("pool", lambda t: F.max_pool2d(t, 2)),
        ("flatten", lambda t: t.flatten(1)),
        ("fc", lambda t: t @ net.fc.weight.double().T + net.fc.bias.double()),
    ]
    for name, step in steps:
        h = step(h)
        acts[name] = h
        if name in clip:
            low, high = clip[name]
            h = h.clamp(min=low, max=high)
    return h, acts


def sorted_quantile(values: list[float], q: float, kind: str) -> float:
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    index = math.ceil(rank) if kind == "higher" else math.floor(rank)
    return ordered[min(max(index, 0), len(ordered) - 1)]


def naive_react(
    net: TinyConvNet,
    calib: Tensor,
    x: Tensor,
    layers: list[tuple[int, int]],
    percentile: float,
    symmetric: bool,
    per_layer: bool,
    act_norm: float | None,
) -> Tensor:
    names = [LAYER_NAMES[layer] for layer in sorted(layers)]  # firing order = id order here
    _, acts = manual_forward(net, calib)
    if per_layer:
        groups = [[acts[name].flatten(1)] for name in names]
    else:
        groups = [[torch.cat([acts[name].flatten(1) for name in names], dim=1)]]
    q = percentile / 100
    thresholds = []
    for (group,) in groups:
        rows = group.tolist()
        if act_norm is not None:
            rows = [
                [v / sum(abs(w) ** act_norm for w in row) ** (1 / act_norm) for v in row]
                for row in rows
            ]
        values = [v for row in rows for v in row]
        high = sorted_quantile(values, q, "higher")
        low = sorted_quantile(values, 1 - q, "lower") if symmetric else None
        thresholds.append((low, high))
    if not per_layer:
        thresholds = thresholds * len(names)
    clip = dict(zip(names, thresholds))
    clipped, _ = manual_forward(net, x, clip)
    rows = []
    for row in clipped.tolist():
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        rows.append([e / sum(exps) for e in exps])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("layers", "percentile", "symmetric", "per_layer", "act_norm"),
    [
        ([(1, 3)], 90.0, False, False, None),
        ([(1, 2), (1, 3)], 80.0, True, False, None),
        ([(1, 2), (1, 3)], 75.0, True, True, None),
        ([(1, 1), (1, 4)], 95.0, False, True, 2.0),
        ([(1, 1), (1, 4)], 60.0, True, False, 1.0),
        ([(1, 3)], 100.0, True, False, None),
    ],
)
def test_react_matches_naive(
    dtype: torch.dtype,
    layers: list[tuple[int, int]],
    percentile: float,
    symmetric: bool,
    per_layer: bool,
    act_norm: float | None,
) -> None:
    generator = torch.Generator().manual_seed(4)
    net = make_net(dtype=dtype, seed=1)
    calib = torch.randn(13, 1, 4, 4, generator=generator).to(dtype)
    x = (2 * torch.randn(6, 1, 4, 4, generator=generator)).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*layers)
    params = {"percentile": percentile, "symmetric": symmetric, "per_layer": per_layer}
    score = ReAct(act_norm=act_norm, **params).fit(rnet, calib, ...)
    assert len(score.clip_high) == (len(layers) if per_layer else 1)
    assert all((low is None) is not symmetric for low in score.clip_low)
    out, conformity = score(x)
    with torch.no_grad():
        assert torch.equal(out, net(x))
    assert conformity.shape == (6, 3)
    assert conformity.dtype == dtype
    expected = naive_react(net, calib, x, layers, percentile, symmetric, per_layer, act_norm)
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(conformity.double(), expected, atol=tol, rtol=tol)


def test_thresholds_exact_and_dataloader_fit() -> None:
    net = make_net(dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(30, 1, 4, 4, generator=generator, dtype=torch.float64)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 2), (1, 5))
    loader = DataLoader(TensorDataset(calib, torch.zeros(30)), batch_size=7)
    for per_layer in (False, True):
        ref = ReAct(percentile=85.0, symmetric=True, per_layer=per_layer).fit(rnet, calib)
        streamed = ReAct(percentile=85.0, symmetric=True, per_layer=per_layer).fit(rnet, loader)
        for a, b in zip(ref.clip_high + ref.clip_low, streamed.clip_high + streamed.clip_low):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(streamed(calib)[1], ref(calib)[1])
    _, acts = manual_forward(net, calib)
    values = acts["softplus"].flatten().tolist()
    assert float(ref.clip_high[0]) == sorted_quantile(values, 0.85, "higher")
    low = ref.clip_low[0]
    assert low is not None
    assert float(low) == sorted_quantile(values, 0.15, "lower")


def test_half_precision_large_calibration() -> None:
    """More than 65504 float16 values: exact quantile (the rank is not computed in half)."""
    net = make_net(dtype=torch.float16)
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(2100, 1, 4, 4, generator=generator).to(torch.float16)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 1))  # 32 values per sample: 67200 values
    score = ReAct(percentile=90.0, symmetric=True).fit(rnet, calib)
    with torch.no_grad():
        rnet(calib)
    values = sorted(next(iter(rnet.activations.values())).double().flatten().tolist())
    n = len(values)
    assert float(score.clip_high[0]) == values[math.ceil(0.9 * (n - 1))]
    low = score.clip_low[0]
    assert low is not None
    assert float(low) == values[math.floor(0.1 * (n - 1))]
    assert not score(calib[:5])[1].isnan().any()


def test_inputs_untouched_and_checks() -> None:
    net = make_net()
    x = torch.rand(8, 1, 4, 4)
    saved = x.clone()
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record((1, 3))
    score = ReAct().fit(rnet, x)
    out, conformity = score(x)
    assert torch.equal(x, saved)
    assert not x.requires_grad
    assert not out.requires_grad
    assert not conformity.requires_grad
    assert rnet.activations == {}
    for bad in (
        {"percentile": 0.0},
        {"percentile": 101.0},
        {"percentile": 50.0, "symmetric": True},
        {"percentile": 30.0, "symmetric": True},
    ):
        with pytest.raises(AssertionError):
            ReAct(**bad).fit(rnet, x)
    ReAct(percentile=50.0).fit(rnet, x)
    ReAct(percentile=50.1, symmetric=True).fit(rnet, x)
    assert repr(ReAct()) == (
        "ReAct[unfit](act_norm=None, mode='raw', percentile=90.0, symmetric=False, per_layer=False)"
    )
    assert set(ReAct._fitted_attrs) == {"clip_low", "clip_high"}


def test_fit_jointly_equals_fit() -> None:
    net = make_net()
    x = torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    joint = ReAct(symmetric=True, per_layer=True)
    other = ReAct(percentile=70.0)
    fit_jointly([(joint, [(1, 2), (1, 5)]), (other, [(1, 3)])], net, x, batch_size=7)
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record((1, 2), (1, 5))
    ref = ReAct(symmetric=True, per_layer=True).fit(rnet, x)
    for a, b in zip(joint.clip_high + joint.clip_low, ref.clip_high + ref.clip_low):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(joint(x)[1], ref(x)[1])
