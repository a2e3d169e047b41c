"""Residual against an independent numpy computation (OpenOOD's procedure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import scio
from scio.recorder import Recorder
from scio.scores import Residual
from scio.scores.core.base import ParamError


def _features(net: nn.Module, x: Tensor) -> np.ndarray:
    with torch.no_grad():
        return net.flatten(net.pool(net.softplus(net.conv(x)))).double().numpy()


def _naive(net: nn.Module, calib: np.ndarray, test: np.ndarray, dim: int) -> np.ndarray:
    """Origin ``-pinv(W) b``, eigenvectors of the centred second moment sorted by
    decreasing eigenvalue (general ``eig``), residual norm outside the first ``dim``."""
    weight = net.fc.weight.detach().double().numpy()
    bias = net.fc.bias.detach().double().numpy()
    origin = -np.linalg.pinv(weight) @ bias
    centred = calib - origin
    moment = centred.T @ centred / len(calib)
    eigvals, eigvecs = np.linalg.eig(moment)
    order = np.argsort(-eigvals.real)
    residual_space = eigvecs.real[:, order[dim:]]
    return -np.linalg.norm((test - origin) @ residual_space, axis=1)


def _setup(dtype: torch.dtype) -> tuple[nn.Module, Recorder, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(11)
    net = make_net(dtype=dtype, n_channels=2, n_classes=3, seed=5)  # 12 features
    calib = torch.rand(50, 2, 4, 4, generator=generator).to(dtype)
    test = torch.cat([torch.rand(5, 2, 4, 4, generator=generator), 3 * torch.randn(4, 2, 4, 4)])
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    return net, rnet, calib, test.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 6, 11])
def test_residual_matches_naive(dtype: torch.dtype, dim: int) -> None:
    net, rnet, calib, test = _setup(dtype)
    score = Residual(dim=dim).fit(rnet, calib)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (9, 3)
    assert torch.equal(conformity[:, 0], conformity[:, 2])
    expected = _naive(net, _features(net, calib), _features(net, test), dim)
    tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-8}[dtype]
    torch.testing.assert_close(
        conformity[:, 0].double(), torch.from_numpy(expected), atol=tol, rtol=tol
    )
    assert bool((score.eigenvalues[:-1] >= score.eigenvalues[1:]).all())


def test_residual_dataloader_equals_tensor_and_save_load(tmp_path: Path) -> None:
    net, rnet, calib, test = _setup(torch.float32)
    score = Residual(dim=6).fit(rnet, calib)
    loader = DataLoader(TensorDataset(calib, torch.zeros(50, dtype=torch.long)), batch_size=7)
    streamed = Residual(dim=6).fit(rnet, loader)
    torch.testing.assert_close(streamed(test)[1], score(test)[1], atol=1e-5, rtol=1e-5)
    score.save(tmp_path / "residual.pt")
    loaded = scio.load_score(tmp_path / "residual.pt", net)
    assert repr(loaded) == repr(score)
    assert torch.equal(loaded(test)[1], score(test)[1])


def test_residual_parameter_checks() -> None:
    for value in (0, -3):
        with pytest.raises(
            ParamError, match=rf"`dim` of Residual must be an integer >= 1 \(got {value}"
        ):
            Residual(dim=value)
    with pytest.raises(TypeError, match="`dim` of Residual must be int"):
        Residual(dim=2.5)
    _, rnet, calib, _ = _setup(torch.float32)
    message = r"`dim` must satisfy 0 < dim < d = 12 .* \(got dim=512\)"
    with pytest.raises(ParamError, match=message):
        Residual().fit(rnet, calib)  # OpenOOD's default is for wider features
