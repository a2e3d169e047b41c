"""The traced graphs behind an exported score, on networks where recording is delicate:
nested recorded modules, a module called twice, a skip connection around the shaped layer,
the whole network recorded, structured outputs. Each exported module must equal the score
(whose recorder uses hooks), shaped forwards (ReAct) included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scio.export import as_module, export_program
from scio.recorder import Recorder
from scio.scores import KNN, BaseScore, ReAct, ViM


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.act = nn.Softplus()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.block(x)))


class _Reused(nn.Module):
    """One activation module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.Softplus()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class _Skip(nn.Module):
    """A skip connection around ``fc2`` (the tail after it alone cannot rerun)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.Softplus()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.head(self.act(self.fc2(h)) + h)


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.act = nn.Softplus()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.act(self.fc1(x))
        return {"features": features, "logits": self.head(features)}


def _net(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _check(net: nn.Module, score: BaseScore, *layers: object, **recorder: object) -> None:
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(50, 6, generator=generator)
    x = torch.randn(9, 6, generator=generator)
    rnet = Recorder(net, input_data=calib[:1], **recorder)  # type: ignore[arg-type]
    rnet.record(*layers)  # type: ignore[arg-type]
    score.fit(rnet, calib)
    expected = score(x)
    module = as_module(score)
    out, conformity = module(x)
    torch.testing.assert_close(out, expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(conformity, expected[1], atol=1e-5, rtol=1e-6)
    program = export_program(module, x[:4]).module()
    with torch.no_grad():
        exported = program(x[:3])
    torch.testing.assert_close(exported[1], expected[1][:3], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("per_layer", [False, True])
def test_nested_recorded_modules(per_layer: bool) -> None:
    # the block and its last linear layer: post-processed inside and outside
    _check(_net(_Nested), ReAct(percentile=70.0, per_layer=per_layer), "block", "block.2")
    _check(_net(_Nested), KNN(k=3, act_norm=None), "block", "block.1")


def test_a_module_called_twice_records_the_chosen_call() -> None:
    net = _net(_Reused)
    rows = Recorder(net, input_data=torch.zeros(1, 6)).layer_names
    second = [row for row, name in rows.items() if name == "act"][1]
    _check(net, ReAct(percentile=60.0), second)
    _check(net, KNN(k=3), second)


def test_skip_connection_reruns_the_whole_shaped_network() -> None:
    net = _net(_Skip)
    rnet = Recorder(net, input_data=torch.zeros(1, 6))
    rnet.record("fc2")
    module = as_module(ReAct().fit(rnet, torch.randn(20, 6)))
    graphs = module.replay.__dict__["_graphs"]
    assert graphs.tail is None
    assert "computed before the first recorded layer" in str(graphs.tail_reason)
    _check(_net(_Skip), ReAct(percentile=80.0), "fc2")
    _check(_net(_Skip), ReAct(percentile=80.0), "fc1")  # the skip starts at fc1: it splits


def test_the_tail_alone_reruns_when_the_network_splits() -> None:
    net = _net(_Reused)
    rnet = Recorder(net, input_data=torch.zeros(1, 6))
    rnet.record("fc2")
    module = as_module(ReAct().fit(rnet, torch.randn(20, 6)))
    graphs = module.replay.__dict__["_graphs"]
    assert graphs.tail is not None
    called = {n.target for n in graphs.tail.graph.nodes if n.op == "call_module"}
    assert "fc1" not in called  # nothing upstream of the shaped layer reruns


def test_the_whole_network_recorded() -> None:
    _check(_net(_Nested), KNN(k=2), (0, 1))
    _check(_net(_Nested), ReAct(percentile=90.0), (0, 1))


def test_structured_output_and_head_score() -> None:
    _check(_net(_DictOut), ViM(dim=3), "fc1")
    _check(_net(_DictOut), ReAct(), "act")
