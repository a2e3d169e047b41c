"""KNN against an independent brute-force computation, plus the tutorial end to end."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor

from scio.recorder import Recorder
from scio.scores import KNN


def _brute_force(calib: Tensor, test: Tensor, k: int, metric: str) -> Tensor:
    """k-th neighbour value, with plain float64 loops over L2-normalised features."""
    calib = calib.double().flatten(1)
    test = test.double().flatten(1)
    calib = calib / calib.norm(dim=1, keepdim=True)
    test = test / test.norm(dim=1, keepdim=True)
    result = []
    for query in test:
        if metric == "l2":
            values = sorted(float(((query - ref) ** 2).sum()) for ref in calib)
            result.append(-values[k - 1])
        else:
            values = sorted((float(query @ ref) for ref in calib), reverse=True)
            result.append(values[k - 1])
    return torch.tensor(result, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 4, 20])
def test_knn_matches_brute_force(dtype: torch.dtype, metric: str, k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    net = make_net(dtype=dtype)
    calib = torch.rand(20, 1, 4, 4, generator=generator).to(dtype)
    test = torch.rand(6, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 3), (1, 5))
    score = KNN(k=k, index_metric=metric).fit(rnet, calib, None)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (6, 3)
    assert torch.equal(conformity[:, 0], conformity[:, 1])
    with torch.no_grad():
        torch.testing.assert_close(out, net(test))
        rnet(calib)
        feats_calib = torch.cat([a.flatten(1) for a in rnet.activations.values()], 1)
        rnet(test)
        feats_test = torch.cat([a.flatten(1) for a in rnet.activations.values()], 1)
    expected = _brute_force(feats_calib, feats_test, k, metric)
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(conformity[:, 0].double(), expected, atol=tol, rtol=tol)


def test_knn_param_checks_and_repr() -> None:
    net = make_net()
    calib = torch.rand(5, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    with pytest.raises(AssertionError):
        KNN(k=6).fit(rnet, calib, None)
    with pytest.raises(AssertionError):
        KNN(k=0).fit(rnet, calib, None)
    with pytest.raises(RuntimeError, match=r"Missing parameters for KNN score: \('k',\)"):
        KNN().fit(rnet, calib, None)
    score = KNN(k=2).fit(rnet, calib, None)
    assert repr(score) == "KNN[fit](act_norm=2.0, mode='raw', k=2, index_metric='l2')"
    assert str(score) == "KNN(k=2)"
