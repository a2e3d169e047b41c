"""Shaped forwards rerun only the graph tail, and fall back to a full forward when needed."""

from __future__ import annotations

import logging

import pytest
import torch
from tests.conftest import make_net
from torch import nn

from scio.recorder import Recorder
from scio.recorder.tail import Tail
from scio.scores import ReAct

LAYER_SETS = [((1, 4),), ((1, 2),), ((1, 2), (1, 4))]


def _calls(net: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, module in net.named_children():

        def hook(*_: object, name: str = name) -> None:
            counts[name] = counts.get(name, 0) + 1

        module.register_forward_hook(hook)
    return counts


def _full(score: ReAct, inputs: torch.Tensor) -> torch.Tensor:
    """ReAct conformity with a forced full second forward."""
    score.rnet._tail = Tail(score.rnet)
    score.rnet._tail._fallback("forced by the test")
    return score(inputs)[1]


@pytest.mark.parametrize("layers", LAYER_SETS, ids=str)
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_tail_rerun_equals_full_rerun(layers: tuple, per_layer: bool, dtype: torch.dtype) -> None:
    net = make_net(dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(30, 1, 4, 4, generator=generator).to(dtype)
    test = torch.randn(9, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record(*layers)
    score = ReAct(percentile=60.0, per_layer=per_layer).fit(rnet, calib)
    tail_conf = score(test)[1]
    assert rnet._tail.splits, rnet._tail.reason
    torch.testing.assert_close(tail_conf, _full(score, test), rtol=0, atol=0)


def test_tail_does_not_rerun_upstream_layers() -> None:
    net = make_net()
    calib = torch.randn(30, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    score = ReAct().fit(rnet, calib)
    score(calib[:3])  # first call: builds and checks the tail once
    counts = _calls(net)
    score(calib[:3])
    assert counts == {"conv": 1, "softplus": 1, "pool": 1, "flatten": 1, "fc": 2}


class _Skip(nn.Module):
    """The tail reuses a value computed before the recorded layer (a skip connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.head(self.b(h) + h)


class _UsesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x) + x)


class _Dynamic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 1e9:  # data-dependent: not traceable
            h = h * 2
        return self.head(h)


@pytest.mark.parametrize(
    ("net_cls", "layer", "reason"),
    [
        (_Skip, "b", "computed before the shaped layer"),
        (_UsesInput, "a", "uses the network input"),
        (_Dynamic, "a", "cannot trace"),
    ],
)
def test_unsplittable_networks_fall_back_to_a_full_forward(
    net_cls: type[nn.Module], layer: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    net = net_cls().eval()
    calib = torch.randn(40, 4)
    rnet = Recorder(net, input_data=calib[:1], force_static_flow=False)
    rnet.record(layer)
    score = ReAct(percentile=70.0).fit(rnet, calib)
    with caplog.at_level(logging.DEBUG, logger="scio.recorder.tail"):
        conformity = score(calib[:7])[1]
    assert not rnet._tail.splits
    assert reason in rnet._tail.reason
    assert any(reason in record.getMessage() for record in caplog.records)
    # the fallback is the reference computation: clip through hooks in a full forward
    high = score.clip_high[0]
    module = dict(net.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _a, out: out.clamp(max=high))
    with torch.no_grad():
        expected = torch.softmax(net(calib[:7]), dim=1)
    handle.remove()
    torch.testing.assert_close(conformity, expected)


def test_tail_that_disagrees_with_the_network_is_not_used() -> None:
    net = make_net()
    calib = torch.randn(20, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    score = ReAct().fit(rnet, calib)
    tail = Tail(rnet)
    assert tail.splits
    tail._graph = lambda activation: activation.sum(1, keepdim=True).expand(-1, 3)
    rnet._tail = tail
    conformity = score(calib[:5])[1]
    assert not tail.splits
    assert "does not reproduce" in tail.reason
    torch.testing.assert_close(conformity, _full(score, calib[:5]))


@pytest.mark.parametrize("kind", ["energy", "logit", "msp"])
def test_react_readouts(kind: str) -> None:
    net = make_net(dtype=torch.float64)
    calib = torch.randn(30, 1, 4, 4, dtype=torch.float64)
    test = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    score = ReAct(percentile=80.0, readout=kind).fit(rnet, calib)
    assert "readout" in repr(score)
    with torch.no_grad():
        clipped = net.fc(
            net.flatten(net.pool(net.softplus(net.conv(test)))).clamp(max=score.clip_high[0])
        )
    expected = {
        "energy": torch.logsumexp(clipped, 1, keepdim=True).expand(-1, 3),
        "logit": clipped,
        "msp": torch.softmax(clipped, 1).max(1, keepdim=True).values.expand(-1, 3),
    }[kind]
    torch.testing.assert_close(score(test)[1], expected)
    assert "readout" not in repr(ReAct())  # the reference repr is unchanged


def test_unknown_readout() -> None:
    net = make_net()
    calib = torch.randn(10, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    with pytest.raises(ValueError, match="`readout` must be one of"):
        ReAct(readout="bogus").fit(rnet, calib)
