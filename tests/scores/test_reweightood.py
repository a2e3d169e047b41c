"""ReweightOOD and Mahalanobis++ (``normalize=True``) against naive float64 loops."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import DTYPES, make_net
from tests.scores.test_mahalanobis import LAYERS, N_CLASSES, TOL, _data, _features, _naive
from torch.utils.data import DataLoader, TensorDataset

import scio
from scio.recorder import Recorder
from scio.scores import DeepMahalanobis, RelativeMahalanobis, ReweightOOD


def _unit(layers: list[np.ndarray]) -> list[np.ndarray]:
    return [f / np.linalg.norm(f, axis=1, keepdims=True) for f in layers]


def _naive_features(rnet: Recorder, x: torch.Tensor) -> list[np.ndarray]:
    """Per-layer flattened features divided by their L2 norm (numpy)."""
    return _unit(_features(rnet, x, None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [DeepMahalanobis, RelativeMahalanobis])
def test_normalize_matches_naive(dtype: torch.dtype, cls: type[DeepMahalanobis]) -> None:
    """(``act_norm`` rescales each layer of a sample by one number: the L2 normalisation
    absorbs it, so it is left at None here.)"""
    calib, labels, test = _data(dtype)
    rnet = Recorder(make_net(dtype=dtype), input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = cls(normalize=True).fit(rnet, calib, labels)
    _, conformity = score(test)
    assert conformity.dtype == dtype and conformity.shape == (7, N_CLASSES)
    expected = _naive(
        _naive_features(rnet, calib),
        labels.numpy(),
        _naive_features(rnet, test),
        relative=cls is RelativeMahalanobis,
    )
    np.testing.assert_allclose(
        conformity.double().numpy(), expected, rtol=TOL[dtype], atol=TOL[dtype]
    )
    plain = cls().fit(rnet, calib, labels)
    assert not torch.allclose(plain(test)[1][:, :2], conformity[:, :2])  # the option matters


def test_normalize_is_an_extension_that_unfits() -> None:
    calib, labels, _ = _data(torch.float32)
    rnet = Recorder(make_net(), input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = DeepMahalanobis().fit(rnet, calib, labels)
    assert "normalize" not in repr(score)  # the reference's repr is unchanged by default
    score.normalize = True
    assert not score.is_fit and "normalize=True" in repr(score)
    score.fit(rnet, calib, labels)
    rnet(calib[:5])  # the public helper reads the features as modelled: unit rows per layer
    for layer in score.activations():
        torch.testing.assert_close(layer.norm(dim=1), torch.ones(5))
    (joined,) = score.activations(concatenate=True)
    torch.testing.assert_close(joined.square().sum(dim=1), torch.full((5,), 2.0))
    with pytest.raises(TypeError, match="`normalize` of DeepMahalanobis must be bool"):
        DeepMahalanobis(normalize=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reweightood_matches_naive(dtype: torch.dtype) -> None:
    calib, labels, test = _data(dtype)
    net = make_net(dtype=dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = ReweightOOD().fit(rnet, calib, labels)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (7, N_CLASSES)
    assert torch.equal(conformity[:, 0], conformity[:, 2])
    per_class = _naive(
        _naive_features(rnet, calib),
        labels.numpy(),
        _naive_features(rnet, test),
        relative=False,
    )
    expected = per_class.max(axis=1)  # the absent class (-inf) never wins
    assert np.isfinite(expected).all()
    tol = TOL[dtype]
    np.testing.assert_allclose(conformity[:, 0].double().numpy(), expected, rtol=tol, atol=tol)
    unnormalised = ReweightOOD(normalize=False).fit(rnet, calib, labels)
    plain = _naive(
        _features(rnet, calib, None), labels.numpy(), _features(rnet, test, None), relative=False
    )
    np.testing.assert_allclose(
        unnormalised(test)[1][:, 1].double().numpy(), plain.max(axis=1), rtol=tol, atol=tol
    )


def test_reweightood_dataloader_equals_tensor_and_save_load(tmp_path: Path) -> None:
    calib, labels, test = _data(torch.float64)
    net = make_net(dtype=torch.float64)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*LAYERS)
    whole = ReweightOOD().fit(rnet, calib, labels)
    batched = ReweightOOD().fit(rnet, DataLoader(TensorDataset(calib, labels), batch_size=7))
    torch.testing.assert_close(whole(test)[1], batched(test)[1])
    whole.save(tmp_path / "reweightood.pt")
    loaded = scio.load_score(tmp_path / "reweightood.pt", net)
    assert type(loaded) is ReweightOOD and repr(loaded) == repr(whole)
    assert torch.equal(loaded(test)[1], whole(test)[1])
    with pytest.warns(UserWarning, match="Non-finite covariance"):
        lonely = ReweightOOD().fit(rnet, calib[:1], labels[:1])
    assert bool((lonely(test)[1] == -math.inf).all())  # no usable class: -inf
