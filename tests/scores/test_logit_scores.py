"""Softmax, BaselineClassif, Logit, Energy and JointEnergy against naive float64 formulas."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification.energy import Energy
from scio.scores.classification.jointenergy import JointEnergy
from scio.scores.classification.logit import Logit
from scio.scores.classification.softmax import BaselineClassif, Softmax
from scio.scores.core.base import BaseScore

TOL = {torch.float16: 3e-3, torch.float32: 1e-5, torch.float64: 1e-10}


def _rows(out: Tensor) -> list[list[float]]:
    return out.double().tolist()


def naive_softmax(out: Tensor) -> list[list[float]]:
    result = []
    for row in _rows(out):
        top = max(row)
        exps = [math.exp(z - top) for z in row]
        result.append([e / sum(exps) for e in exps])
    return result


def naive_logit(out: Tensor) -> list[list[float]]:
    return _rows(out)


def naive_energy(out: Tensor, temperature: float) -> list[list[float]]:
    result = []
    for row in _rows(out):
        top = max(z / temperature for z in row)
        lse = top + math.log(sum(math.exp(z / temperature - top) for z in row))
        result.append([temperature * lse] * len(row))
    return result


def naive_joint_energy(out: Tensor) -> list[list[float]]:
    result = []
    for row in _rows(out):
        total = 0.0
        for z in row:  # log(1 + e^z), written stably by hand
            total += z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))
        result.append([total] * len(row))
    return result


CASES: list[tuple[Callable[[], BaseScore], Callable[[Tensor], list[list[float]]]]] = [
    (Softmax, naive_softmax),
    (BaselineClassif, naive_softmax),
    (Logit, naive_logit),
    (Energy, lambda out: naive_energy(out, 1.0)),
    (lambda: Energy(temperature=0.3), lambda out: naive_energy(out, 0.3)),
    (lambda: Energy(temperature=7.0), lambda out: naive_energy(out, 7.0)),
    (JointEnergy, naive_joint_energy),
]
IDS = ["softmax", "baseline", "logit", "energy", "energy-T0.3", "energy-T7", "jointenergy"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("make_score", "naive"), CASES, ids=IDS)
def test_matches_naive_formula(
    make_score: Callable[[], BaseScore],
    naive: Callable[[Tensor], list[list[float]]],
    dtype: torch.dtype,
) -> None:
    generator = torch.Generator().manual_seed(1)
    net = make_net(dtype=dtype, n_classes=4)
    calib = torch.rand(10, 1, 4, 4, generator=generator).to(dtype)
    test = (3 * torch.randn(8, 1, 4, 4, generator=generator)).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 3))  # recorded layers are irrelevant for these scores
    score = make_score().fit(rnet, calib, ...)  # labels are ignored
    out, conformity = score(test)
    with torch.no_grad():
        expected_out = net(test)
    assert torch.equal(out, expected_out)
    assert conformity.shape == (8, 4)
    assert conformity.dtype == dtype
    assert not conformity.isnan().any()
    expected = torch.tensor(naive(expected_out), dtype=torch.float64)
    tol = TOL[dtype]
    torch.testing.assert_close(conformity.double(), expected, atol=tol, rtol=tol)


def test_extreme_logits_stay_finite() -> None:
    out = torch.tensor([[1000.0, -1000.0, 0.0], [-800.0, -900.0, -1000.0]], dtype=torch.float64)

    class Fixed(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.flatten(1)

    rnet = Recorder(Fixed().eval(), input_data=out[:1])
    for score, naive in [
        (Softmax(), naive_softmax),
        (Energy(), lambda o: naive_energy(o, 1.0)),
        (JointEnergy(), naive_joint_energy),
    ]:
        score.fit(rnet, out)
        _, conformity = score(out)
        expected = torch.tensor(naive(out), dtype=torch.float64)
        torch.testing.assert_close(conformity, expected)


def test_calibration_runs_no_forward_and_dataloader_fit() -> None:
    net = make_net()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 4, 4, generator=generator)
    rnet = Recorder(net, input_data=x[[0]])
    calls: list[int] = []
    handle = net.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for cls in (Softmax, BaselineClassif, Logit, Energy, JointEnergy):
            loader = DataLoader(TensorDataset(x, torch.zeros(20)), batch_size=7)
            streamed = cls().fit(rnet, loader)
            ref = cls().fit(rnet, x, None)
            assert calls == []
            assert streamed.timer.calibration[0].n_samples == 20
            assert torch.equal(streamed(x)[1], ref(x)[1])
            calls.clear()
    finally:
        handle.remove()


def test_inputs_untouched_and_logit_copy() -> None:
    net = make_net()
    x = torch.rand(6, 1, 4, 4)
    saved = x.clone()
    rnet = Recorder(net, input_data=x[[0]])
    for cls in (Softmax, Logit, Energy, JointEnergy):
        score = cls().fit(rnet, x)
        out, conformity = score(x)
        assert torch.equal(x, saved)
        assert not x.requires_grad
        assert not out.requires_grad
        assert not conformity.requires_grad
    out, conformity = Logit().fit(rnet, x)(x)
    assert conformity.data_ptr() != out.data_ptr()


def test_params_checks_and_repr() -> None:
    net = make_net()
    x = torch.rand(4, 1, 4, 4)
    rnet = Recorder(net, input_data=x[[0]])
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(AssertionError):
            Energy(temperature=bad).fit(rnet, x)
    assert repr(Energy()) == "Energy[unfit](act_norm=None, mode='raw', temperature=1.0)"
    assert str(Energy(temperature=2.0)) == "Energy(temperature=2.0)"
    assert repr(Softmax().fit(rnet, x)) == "Softmax[fit](act_norm=None, mode='raw')"
    assert str(BaselineClassif()) == "BaselineClassif()"
    assert issubclass(BaselineClassif, Softmax)
    assert repr(JointEnergy()) == "JointEnergy[unfit](act_norm=None, mode='raw')"
    assert repr(Logit()) == "Logit[unfit](act_norm=None, mode='raw')"


def test_modes_apply() -> None:
    net = make_net()
    x = torch.rand(5, 1, 4, 4)
    rnet = Recorder(net, input_data=x[[0]])
    score = Softmax(mode="diff").fit(rnet, x)
    _, conformity = score(x)
    assert ((conformity >= 0).sum(dim=1) == 1).all()
    score.mode = "ratio"
    assert score.is_fit
    _, conformity = score(x)
    assert ((conformity >= 1).sum(dim=1) == 1).all()
