"""LID against a naive float64 maximum-likelihood estimate with plain loops."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification.lid import LID

LAYERS = ((1, 3), (1, 5))


def _features(rnet: Recorder, x: Tensor, act_norm: float | None) -> Tensor:
    with torch.no_grad():
        rnet(x)
    feats = torch.cat([a.flatten(1) for a in rnet.activations.values()], dim=1)
    if act_norm is not None:
        norms = feats.double().norm(p=act_norm, dim=1, keepdim=True)
        feats = (feats.double() / norms).to(feats.dtype)
    return feats.double()


def _naive_lid(calib: Tensor, test: Tensor, k: int) -> list[float]:
    result = []
    for query in test.tolist():
        d2 = sorted(
            sum((a - b) ** 2 for a, b in zip(query, ref, strict=True)) for ref in calib.tolist()
        )[:k]
        if d2[0] == 0:
            lid = 0.0
        else:
            total = sum(math.log(d2[-1] / d) for d in d2)
            lid = k / total if total > 0 else math.inf
        result.append(-2 * lid)
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("k", "act_norm"), [(1, None), (3, 2.0), (10, None), (40, 1.0)])
def test_lid_matches_naive(dtype: torch.dtype, k: int, act_norm: float | None) -> None:
    generator = torch.Generator().manual_seed(k)
    net = make_net(dtype=dtype)
    calib = torch.rand(40, 1, 4, 4, generator=generator).to(dtype)
    test = torch.rand(6, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = LID(k=k, act_norm=act_norm).fit(rnet, calib, ...)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (6, 3)
    assert torch.equal(conformity[:, 0], conformity[:, 2])
    with torch.no_grad():
        torch.testing.assert_close(out, net(test))
    expected = torch.tensor(
        _naive_lid(_features(rnet, calib, act_norm), _features(rnet, test, act_norm), k),
        dtype=torch.float64,
    )
    if k == 1:  # the estimate is undefined: +inf, conformity -inf
        assert torch.equal(expected, torch.full_like(expected, -math.inf))
    tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    torch.testing.assert_close(conformity[:, 0].double(), expected, atol=tol, rtol=tol)


def test_lid_query_on_calibration_point_and_dataloader() -> None:
    generator = torch.Generator().manual_seed(0)
    calib = torch.rand(30, 1, 4, 4, generator=generator, dtype=torch.float64)
    rnet = Recorder(make_net(dtype=torch.float64), input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = LID(k=5).fit(rnet, calib, None)
    _, conformity = score(calib)  # every query coincides with a calibration point
    assert torch.equal(conformity, torch.zeros_like(conformity))
    test = torch.rand(6, 1, 4, 4, generator=generator, dtype=torch.float64)
    loader = DataLoader(TensorDataset(calib, torch.zeros(30)), batch_size=7)
    batched = LID(k=5).fit(rnet, loader)
    torch.testing.assert_close(batched(test)[1], score(test)[1])


def test_lid_params_and_inputs_untouched() -> None:
    calib = torch.rand(5, 1, 4, 4)
    rnet = Recorder(make_net(), input_data=calib[[0]])
    rnet.record((1, 4))
    for k in (0, 6):
        with pytest.raises(AssertionError):
            LID(k=k).fit(rnet, calib, None)
    with pytest.raises(RuntimeError, match=r"Missing parameters for LID score: \('k',\)"):
        LID().fit(rnet, calib, None)
    before = calib.clone()
    score = LID(k=2).fit(rnet, calib, None)
    score(calib)
    assert torch.equal(calib, before) and not calib.requires_grad
    assert repr(score) == "LID[fit](act_norm=None, mode='raw', k=2)"
    score.k = 3
    assert not score.is_fit
