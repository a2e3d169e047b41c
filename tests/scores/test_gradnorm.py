"""GradNorm: closed form (final linear layer) and torch.func path against a naive loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification.gradnorm import GradNorm


def naive_gradnorm(
    net: nn.Module, x: Tensor, param_names: list[str], temperature: float, p: float
) -> Tensor:
    """One backward per sample in float64 on a copy of the network."""
    net = copy.deepcopy(net).double()
    params = dict(net.named_parameters())
    result = []
    for sample in x.double():
        logits = net(sample[None])[0] / temperature
        log_probs = logits - torch.logsumexp(logits, dim=0)
        loss = -sum(log_probs[c] for c in range(len(log_probs))) / len(log_probs)
        grads = torch.autograd.grad(loss, [params[name] for name in param_names])
        flat = [float(v) for g in grads for v in g.flatten()]
        if p == math.inf:
            result.append(max(abs(v) for v in flat))
        else:
            result.append(sum(abs(v) ** p for v in flat) ** (1 / p))
    return torch.tensor(result, dtype=torch.float64)


class ScaledHead(nn.Module):
    """The final linear output is modified afterwards: no closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_net()
        self.fc2 = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.body(x)) * 2


class TwiceHead(nn.Module):
    """The recorded linear layer is called twice: no closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.fc(x)))


class TiedHead(nn.Module):
    """The final layer shares its weight with an earlier layer: no closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 4)
        self.fc.weight = self.first.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.first(x)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("layers", "temperature", "p"),
    [
        ([(1, 5)], 1.0, 1.0),
        ([(1, 5)], 2.5, 2.0),
        ([(1, 5)], 0.5, math.inf),
        ([(1, 1)], 1.0, 1.0),
        ([(1, 1), (1, 5)], 2.0, 3.0),
        ([(0, 1)], 1.0, math.inf),
    ],
)
def test_gradnorm_matches_naive(
    dtype: torch.dtype, layers: list[tuple[int, int]], temperature: float, p: float
) -> None:
    generator = torch.Generator().manual_seed(6)
    net = make_net(dtype=dtype, seed=4)
    calib = torch.rand(5, 1, 4, 4, generator=generator).to(dtype)
    x = torch.rand(7, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*layers)
    score = GradNorm(temperature=temperature, grad_norm=p).fit(rnet, calib, ...)
    out, conformity = score(x)
    assert conformity.shape == (7, 3)
    assert conformity.dtype == out.dtype == dtype
    assert torch.equal(conformity[:, 0], conformity[:, 2])
    with torch.no_grad():
        expected_out = net(x)
    if layers == [(1, 5)] or dtype != torch.float16:
        assert torch.equal(out, expected_out)
    torch.testing.assert_close(out, expected_out, atol=1e-2, rtol=1e-2)
    names = [name.removeprefix("_net.") for name in rnet.recorded_params]
    expected = naive_gradnorm(net, x, names, temperature, p)
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(conformity[:, 0].double(), expected, atol=tol, rtol=tol)
    assert all(param.grad is None for param in net.parameters())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frozen", [None, "bias", "weight"])
def test_closed_form_agrees_with_functional_path(dtype: torch.dtype, frozen: str | None) -> None:
    generator = torch.Generator().manual_seed(7)
    net = make_net(dtype=dtype, seed=5)
    if frozen is not None:
        getattr(net.fc, frozen).requires_grad_(False)
    x = torch.randn(9, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record((1, 5))
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    for p in (1.0, 2.0, 0.5, math.inf, -math.inf, 0.0):
        score = GradNorm(temperature=1.5, grad_norm=p).fit(rnet, x)
        params = score._grad_params()
        assert len(params) == (1 if frozen else 2)
        owner = score._linear_owner()
        assert owner is not None
        assert owner[0] is net.fc
        out, closed = score._closed_form(x, owner)
        assert closed is not None
        out_f, functional = score._functional(x, params)
        torch.testing.assert_close(out_f, out, atol=tol, rtol=tol)
        torch.testing.assert_close(closed.double(), functional.double(), atol=tol, rtol=tol)
        if p > 0:
            names = [name.removeprefix("_net.") for name in params]
            expected = naive_gradnorm(net, x, names, 1.5, p)
            torch.testing.assert_close(closed.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("net_cls", [ScaledHead, TwiceHead, TiedHead])
def test_general_path_when_not_a_plain_final_layer(net_cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    net = net_cls().double().eval()
    size = (5, 1, 4, 4) if net_cls is ScaledHead else (5, 4)
    x = torch.rand(size, dtype=torch.float64)
    rnet = Recorder(net, input_data=x[[0]])
    layer = "fc2" if net_cls is ScaledHead else "fc"
    rnet.record(layer)
    score = GradNorm(grad_norm=2.0).fit(rnet, x)
    owner = score._linear_owner()
    if net_cls is TiedHead:
        assert owner is None
    else:
        assert owner is not None
        assert score._closed_form(x, owner)[1] is None
    _, conformity = score(x)
    names = [name.removeprefix("_net.") for name in rnet.recorded_params]
    expected = naive_gradnorm(net, x, names, 1.0, 2.0)
    torch.testing.assert_close(conformity[:, 0], expected)


def test_discard_functional_forward_and_no_params() -> None:
    net = make_net(dtype=torch.float16)
    x = torch.rand(6, 1, 4, 4).half()
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record((1, 1))
    out, _ = GradNorm(discard_functional_forward=True).fit(rnet, x)(x)
    with torch.no_grad():
        assert torch.equal(out, net(x))
    rnet.record((1, 2))  # softplus: no parameters
    score = GradNorm().fit(rnet, x)
    msg = "Recorded layers must have at least one learnable parameters for score GradNorm"
    with pytest.raises(RuntimeError, match=msg):
        score(x)
    rnet.record((1, 5))
    for param in net.parameters():
        param.requires_grad_(False)
    with pytest.raises(RuntimeError, match=msg):
        score(x)


def test_inputs_untouched_dataloader_and_checks() -> None:
    net = make_net()
    x = torch.rand(20, 1, 4, 4)
    saved = x.clone()
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record((1, 1), (1, 5))
    ref = GradNorm().fit(rnet, x)
    streamed = GradNorm().fit(rnet, DataLoader(TensorDataset(x, torch.zeros(20)), batch_size=7))
    out, conformity = ref(x)
    assert torch.equal(conformity, streamed(x)[1])
    assert torch.equal(x, saved)
    assert not x.requires_grad
    assert not out.requires_grad
    assert not conformity.requires_grad
    assert all(param.grad is None for param in net.parameters())
    for bad in (0.0, -1.0):
        with pytest.raises(AssertionError):
            GradNorm(temperature=bad).fit(rnet, x)
    assert repr(GradNorm()) == (
        "GradNorm[unfit](act_norm=None, mode='raw', temperature=1.0, grad_norm=1.0, "
        "discard_functional_forward=False)"
    )


class ShiftedLinear(nn.Linear):
    """A linear subclass with its own forward: not eligible for the closed form."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x + 1)


def test_linear_subclass_with_custom_forward_uses_general_path() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), ShiftedLinear(5, 3)).double().eval()
    x = torch.rand(6, 4, dtype=torch.float64)
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record("2")
    score = GradNorm(grad_norm=1.0).fit(rnet, x)
    assert score._linear_owner() is None
    expected = naive_gradnorm(net, x, ["2.weight", "2.bias"], 1.0, 1.0)
    torch.testing.assert_close(score(x)[1][:, 0], expected)
