"""ViM against an independent float64 computation of the paper's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor

from scio.recorder import Recorder
from scio.scores import ViM
from scio.scores.classification.vim import vim_default_dim, vim_origin


def _features(net: torch.nn.Module, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Head input and logits of TinyConvNet, by calling its modules directly (float64)."""
    with torch.no_grad():
        feats = net.flatten(net.pool(net.softplus(net.conv(x))))
        logits = net.fc(feats)
    return feats.double().numpy(), logits.double().numpy()


def _naive_vim(
    weight: np.ndarray,
    bias: np.ndarray,
    calib: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    dim: int,
) -> np.ndarray:
    """Paper's ViM with numpy/loops: alpha = mean max logit / mean residual norm."""
    origin = -np.linalg.pinv(weight) @ bias
    feats, logits = calib
    moment = np.zeros((feats.shape[1],) * 2)
    for row in feats:
        moment += np.outer(row - origin, row - origin)
    moment /= len(feats)
    eigvals, eigvecs = np.linalg.eigh(moment)
    principal = eigvecs[:, np.argsort(-eigvals)[:dim]]

    def residual(row: np.ndarray) -> float:
        rest = row - origin
        for j in range(dim):  # remove the projection on each principal direction
            rest = rest - float(principal[:, j] @ rest) * principal[:, j]
        return math.sqrt(float(rest @ rest))

    mean_residual = sum(residual(row) for row in feats) / len(feats)
    alpha = float(np.mean([max(row) for row in logits])) / mean_residual
    result = []
    for row, z in zip(*test, strict=True):
        virtual = alpha * residual(row)
        # log(1 - p_v), p_v = exp(v) / (sum exp(z) + exp(v)), shifted by m to stay exact
        m = max(*z, virtual)
        logits_mass = sum(math.exp(v - m) for v in z)
        result.append(math.log(logits_mass) - math.log(logits_mass + math.exp(virtual - m)))
    return np.array(result)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [None, 1, 3, 7])
def test_vim_matches_naive(dtype: torch.dtype, dim: int | None) -> None:
    generator = torch.Generator().manual_seed(3)
    net = make_net(dtype=dtype, seed=2)
    calib = torch.rand(30, 1, 4, 4, generator=generator).to(dtype)
    test = torch.rand(6, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    score = ViM(dim=dim).fit(rnet, calib)
    assert score.head_name == "fc"
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (6, 3)
    assert torch.equal(conformity[:, 0], conformity[:, 2])
    weight = net.fc.weight.detach().double().numpy()
    bias = net.fc.bias.detach().double().numpy()
    expected = _naive_vim(
        weight, bias, _features(net, calib), _features(net, test), 4 if dim is None else dim
    )
    tol = {torch.float16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    np.testing.assert_allclose(conformity[:, 0].double().numpy(), expected, rtol=tol, atol=tol)
    assert (conformity <= 0).all()


def test_vim_hand_made_origin_and_rule() -> None:
    weight = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    bias = torch.tensor([2.0, -8.0])
    torch.testing.assert_close(vim_origin(weight, bias), torch.tensor([-1.0, 2.0]).double())
    torch.testing.assert_close(vim_origin(weight, None), torch.zeros(2).double())
    # Paper's rule: 2048 (ResNet-50) -> 1000, 768 (ViT-B) -> 512, 512 (ResNet-18) -> 256.
    assert [vim_default_dim(d) for d in (2048, 1500, 1024, 768, 512, 8)] == [
        1000,
        1000,
        512,
        512,
        256,
        4,
    ]


def test_vim_residual_only_outside_principal_space() -> None:
    """Features on a line through the origin: residual 0 on it, growing off it."""
    net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2)).eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(2))
        net[1].bias.zero_()
    line = torch.linspace(-1, 1, 21)[:, None] * torch.tensor([[1.0, 0.0]])
    calib = line + torch.tensor([[0.0, 1e-3]]) * torch.randn(
        21, 1, generator=torch.Generator().manual_seed(0)
    )
    rnet = Recorder(net, input_data=calib[[0]], force_static_flow=False)
    rnet.record((1, 1))
    score = ViM(dim=1).fit(rnet, calib)
    on, off = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.5, 0.5]])
    assert score(on)[1][0, 0] > score(off)[1][0, 0]
    torch.testing.assert_close(
        score.residual_basis.abs(), torch.tensor([[0.0], [1.0]]).double(), atol=1e-3, rtol=0
    )


def test_vim_bad_dim() -> None:
    net = make_net()
    calib = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    with pytest.raises(ValueError, match=r"`dim` must satisfy 0 < dim < d = 8 .*got dim=9"):
        ViM(dim=9).fit(rnet, calib)
    with pytest.raises(ValueError, match=r"`dim` must satisfy 0 < dim < d = 8 .*got dim=8"):
        ViM(dim=8).fit(rnet, calib)
    with pytest.raises(
        ValueError, match=r"`dim` of ViM must be an integer >= 1 \(or None\) \(got 0"
    ):
        ViM(dim=0)  # checked at construction (docs/errors.md)
    score = ViM(dim=2).fit(rnet, calib)
    score.set_params(dim=8)
    with pytest.raises(ValueError, match=r"`dim` must satisfy"):
        score.fit(rnet, calib)
    assert not score.is_fit


def test_vim_needs_a_head_after_the_recorded_layer() -> None:
    net = make_net()
    calib = torch.rand(6, 1, 4, 4)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 5))  # the logits: no linear head follows
    with pytest.raises(ValueError, match=r"No linear head follows the recorded layer"):
        ViM().fit(rnet, calib)


def test_vim_alpha_beyond_the_residual_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the budget, the kept rows are every s-th sample (s a power of two): the same
    rows, hence the same alpha, for any batching; the subsample mean stays close."""
    generator = torch.Generator().manual_seed(5)
    net = make_net(dtype=torch.float64, seed=1)
    calib = torch.rand(203, 1, 4, 4, generator=generator).double()
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    exact = ViM(dim=3).fit(rnet, calib)
    monkeypatch.setattr(ViM, "residual_budget", 8 * 40)  # 40 rows of d = 8: stride 8
    whole = ViM(dim=3).fit(rnet, calib)
    batches = [(calib[i : i + 17], None) for i in range(0, len(calib), 17)]
    streamed = ViM(dim=3).fit(rnet, batches)
    assert whole.alpha == pytest.approx(streamed.alpha, rel=1e-12)  # running sums: ulps
    assert whole.alpha != exact.alpha
    assert abs(whole.alpha / exact.alpha - 1) < 0.05
    # the kept rows are positions 0, 8, ..., 200 (26 rows): alpha uses exactly their mean
    weight, bias = net.fc.weight.detach().numpy(), net.fc.bias.detach().numpy()
    feats, logits = _features(net, calib)
    origin = -np.linalg.pinv(weight) @ bias
    basis = whole.residual_basis.numpy()
    mean_residual = np.linalg.norm((feats[::8] - origin) @ basis, axis=1).mean()
    np.testing.assert_allclose(whole.alpha, logits.max(1).mean() / mean_residual, rtol=1e-9)
