"""ODIN against a naive per-sample float64 computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification.odin import ODIN


def naive_odin(net: nn.Module, x: Tensor, temperature: float, epsilon: float, p: float) -> Tensor:
    """Per-sample loop in float64: gradient of the top log-softmax, FGM step, softmax."""
    net = copy.deepcopy(net).double()
    rows = []
    for sample in x.double():
        xi = sample[None].clone().requires_grad_()
        logits = net(xi)[0] / temperature
        top = max(range(len(logits)), key=lambda c: float(logits[c].detach()))
        log_prob = logits[top] - torch.logsumexp(logits, dim=0)
        (g,) = torch.autograd.grad(log_prob, xi)
        g = g.flatten()
        if epsilon == 0:
            direction = torch.zeros_like(g)
        elif p == math.inf:
            direction = g.sign()
        elif p == 1:
            direction = torch.zeros_like(g)
            direction[g.abs().argmax()] = g[g.abs().argmax()].sign()
        else:
            q = p / (p - 1)
            direction = g.abs() ** (q - 1) * g.sign()
            direction = direction / float((direction.abs() ** p).sum()) ** (1 / p)
        x_adv = xi.detach() + epsilon * direction.reshape(xi.shape)
        with torch.no_grad():
            z = [float(v) / temperature for v in net(x_adv)[0]]
        top_z = max(z)
        exps = [math.exp(v - top_z) for v in z]
        rows.append([e / sum(exps) for e in exps])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("temperature", "epsilon", "p"),
    [
        (1.0, 0.0, math.inf),
        (1000.0, 0.0, math.inf),
        (2.0, 0.05, math.inf),
        (1.0, 0.1, 2.0),
        (10.0, 0.1, 1.0),
        (1.0, -0.05, math.inf),
    ],
)
def test_odin_matches_naive(
    dtype: torch.dtype, temperature: float, epsilon: float, p: float
) -> None:
    generator = torch.Generator().manual_seed(2)
    net = make_net(dtype=dtype, seed=3)
    calib = torch.rand(5, 1, 4, 4, generator=generator).to(dtype)
    x = torch.rand(7, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    score = ODIN(temperature=temperature, epsilon=epsilon, fgm_norm=p).fit(rnet, calib, ...)
    out, conformity = score(x)
    with torch.no_grad():
        assert torch.equal(out, net(x))
    assert not out.requires_grad
    assert conformity.shape == (7, 3)
    assert conformity.dtype == dtype
    expected = naive_odin(net, x, temperature, epsilon, p)
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(conformity.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_inputs_and_net_untouched(requires_grad: bool) -> None:
    net = make_net()
    x = torch.rand(6, 1, 4, 4)
    saved = x.clone()
    x.requires_grad_(requires_grad)
    rnet = Recorder(net, input_data=saved[[0]])
    score = ODIN(temperature=2.0, epsilon=0.1).fit(rnet, saved)
    assert score._inference_needs_grad
    with torch.no_grad():  # inference enables the gradient it needs by itself
        out, conformity = score(x)
    assert torch.equal(x.detach(), saved)
    assert x.requires_grad is requires_grad
    assert x.grad is None
    assert all(param.grad is None for param in net.parameters())
    assert not out.requires_grad
    assert not conformity.requires_grad
    assert not ODIN(temperature=2.0)._inference_needs_grad


def test_perturbation_increases_top_probability() -> None:
    net = make_net(dtype=torch.float64)
    x = torch.rand(10, 1, 4, 4, dtype=torch.float64)
    rnet = Recorder(net, input_data=x[[0]])
    base = ODIN(temperature=1.0).fit(rnet, x)(x)[1].amax(dim=1)
    perturbed = ODIN(temperature=1.0, epsilon=1e-3).fit(rnet, x)(x)[1].amax(dim=1)
    assert (perturbed > base).all()


def test_dataloader_fit_equals_tensor_fit() -> None:
    net = make_net()
    x = torch.rand(20, 1, 4, 4)
    rnet = Recorder(net, input_data=x[[0]])
    loader = DataLoader(TensorDataset(x, torch.zeros(20)), batch_size=7)
    streamed = ODIN(temperature=3.0, epsilon=0.01).fit(rnet, loader)
    ref = ODIN(temperature=3.0, epsilon=0.01).fit(rnet, x)
    assert torch.equal(streamed(x)[1], ref(x)[1])


def test_param_checks_and_repr() -> None:
    net = make_net()
    x = torch.rand(4, 1, 4, 4)
    rnet = Recorder(net, input_data=x[[0]])
    with pytest.raises(
        RuntimeError, match=r"Missing parameters for ODIN score: \('temperature',\)"
    ):
        ODIN().fit(rnet, x)
    for bad in ({"temperature": 0.0}, {"temperature": -1.0}, {"temperature": 1.0, "fgm_norm": 0.5}):
        with pytest.raises(AssertionError):
            ODIN(**bad).fit(rnet, x)
    score = ODIN(temperature=1000.0)
    assert repr(score) == (
        "ODIN[unfit](act_norm=None, mode='raw', temperature=1000.0, epsilon=0.0, fgm_norm=inf)"
    )
    assert str(score) == "ODIN(temperature=1000.0)"
