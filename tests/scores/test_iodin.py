"""IODIN against a naive per-sample float64 computation of OpenOOD's formula."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from tests.conftest import make_net
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import scio
from scio.recorder import Recorder
from scio.scores import IODIN
from scio.scores.classification.iodin import iodin_step


def naive_iodin(
    net: nn.Module, x: Tensor, temperature: float, noise: float, std: list[float] | None
) -> Tensor:
    """Per sample, float64: gradient of the cross-entropy with the predicted class (OpenOOD),
    ``x - noise · (2·[g ≥ 0] - 1) / std_c`` at the element of largest ``|g|`` only."""
    net = copy.deepcopy(net).double()
    rows = []
    for sample in x.double():
        xi = sample[None].clone().requires_grad_()
        logits = net(xi)[0]
        pred = max(range(len(logits)), key=lambda c: float(logits[c].detach()))
        loss = torch.logsumexp(logits / temperature, dim=0) - logits[pred] / temperature
        (grad,) = torch.autograd.grad(loss, xi)
        flat = grad.flatten().tolist()
        top = max(range(len(flat)), key=lambda i: (abs(flat[i]), -i))  # first maximum
        per_channel = len(flat) // sample.shape[0]
        scale = 1.0 if std is None else std[top // per_channel]
        moved = xi.detach().flatten().clone()
        moved[top] -= noise * (1.0 if flat[top] >= 0 else -1.0) / scale
        with torch.no_grad():
            z = [float(v) / temperature for v in net(moved.reshape(xi.shape))[0]]
        exps = [math.exp(v - max(z)) for v in z]
        rows.append([e / sum(exps) for e in exps])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("temperature", "noise", "std"),
    [(1000.0, 0.0014, None), (2.0, 0.5, None), (1.0, 0.3, [0.5, 0.25]), (5.0, -0.2, [2.0, 1.0])],
)
def test_iodin_matches_naive(
    dtype: torch.dtype, temperature: float, noise: float, std: list[float] | None
) -> None:
    generator = torch.Generator().manual_seed(1)
    net = make_net(n_channels=2, dtype=dtype, seed=4)
    x = torch.rand(7, 2, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=x[:1])
    score = IODIN(temperature=temperature, noise=noise, input_std=std).fit(rnet, x)
    out, conformity = score(x)
    with torch.no_grad():
        assert torch.equal(out, net(x))
    assert conformity.dtype == dtype and conformity.shape == (7, 3)
    expected = naive_iodin(net, x, temperature, noise, std)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(conformity.double(), expected, rtol=tol, atol=tol)
    if noise:  # the single-element step changes the result
        plain = torch.softmax(net(x).detach().double() / temperature, dim=1)
        assert not torch.allclose(conformity.double(), plain, rtol=1e-12, atol=1e-12)


def test_zero_noise_is_the_tempered_softmax() -> None:
    net = make_net(dtype=torch.float64)
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    score = IODIN(temperature=3.0, noise=0.0).fit(Recorder(net, input_data=x[:1]), x)
    with torch.no_grad():
        expected = torch.softmax(net(x) / 3.0, dim=1)
    torch.testing.assert_close(score(x)[1], expected)


def test_step_is_one_element_per_sample() -> None:
    grad = torch.tensor([[[0.1, -3.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])[:, None]
    step = iodin_step(grad, 0.5, torch.tensor(2.0))
    expected = torch.tensor([[[0.0, -0.25], [0.0, 0.0]], [[-0.25, 0.0], [0.0, 0.0]]])[:, None]
    torch.testing.assert_close(step, expected)  # a zero gradient steps down at the first


def test_loader_fit_max_batch_and_save_load(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(2)
    net = make_net(n_channels=2)
    x = torch.rand(9, 2, 4, 4, generator=generator)
    rnet = Recorder(net, input_data=x[:1])
    one = IODIN(input_std=(0.5, 0.7)).fit(rnet, x)
    loader = DataLoader(TensorDataset(x, torch.zeros(9, dtype=torch.int64)), batch_size=4)
    streamed = IODIN(input_std=(0.5, 0.7), max_batch=2).fit(rnet, loader)
    torch.testing.assert_close(streamed(x)[1], one(x)[1])
    one.save(tmp_path / "iodin.pt")
    loaded = scio.load_score(tmp_path / "iodin.pt", net)
    assert repr(loaded) == repr(one)
    torch.testing.assert_close(loaded(x)[1], one(x)[1], rtol=0, atol=0)


def test_parameter_checks() -> None:
    cases = [
        ({"temperature": 0.0}, r"`temperature` must be a finite number > 0 \(got 0.0\)"),
        ({"temperature": "1"}, r"`temperature` must be a finite number > 0 \(got '1'\)"),
        ({"noise": math.nan}, r"`noise` must be a finite number \(got nan\)"),
        ({"input_std": (0.5, 0.0)}, r"`input_std` must be None, a finite number > 0"),
        ({"input_std": ()}, r"`input_std` must be None, a finite number > 0"),
        ({"max_batch": -1}, r"`max_batch` must be a positive integer or None"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            IODIN(**params)
    net = make_net()
    x = torch.rand(3, 1, 4, 4)
    score = IODIN(input_std=(0.5, 0.5, 0.5)).fit(Recorder(net, input_data=x[:1]), x)
    with pytest.raises(ValueError, match=r"`input_std` must hold one value per input channel"):
        score(x)
    assert (IODIN().temperature, IODIN().noise) == (1000.0, 0.0014)  # OpenOOD's defaults
