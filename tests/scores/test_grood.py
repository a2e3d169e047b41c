"""GROOD against a naive float64 computation (autograd gradients, plain loops)."""

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
from scio.scores import GROOD
from scio.scores.classification.grood import kept_positions


def _features(net: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return net.flatten(net.pool(net.softplus(net.conv(x))))


def naive_gradient(h: Tensor, prototypes: list[Tensor], noise: Tensor, pred: int) -> Tensor:
    """Autograd gradient of CE(-distances to [prototypes, noise], pred) w.r.t. ``noise``."""
    p_ood = noise.clone().requires_grad_()
    logits = torch.stack([-(h - p).norm() for p in prototypes] + [-(h - p_ood).norm()])
    loss = torch.logsumexp(logits, dim=0) - logits[pred]
    (grad,) = torch.autograd.grad(loss, p_ood)
    return grad


def naive_grood(
    net: nn.Module, calib: Tensor, labels: list[int], test: Tensor, k: int, n_noise: int
) -> Tensor:
    net = copy.deepcopy(net).double()
    feats = _features(net, calib.double())
    preds = net(calib.double()).argmax(dim=1).tolist()
    n_classes = net.fc.out_features
    prototypes = []
    for c in range(n_classes):
        rows = [feats[i] for i, y in enumerate(labels) if y == c]
        prototypes.append(sum(rows) / len(rows) if rows else torch.zeros_like(feats[0]))
    ood = [feats[i] for i, y in enumerate(labels) if y == -1][:n_noise]
    noise = sum(ood) / len(ood)
    bank = [
        naive_gradient(feats[i], prototypes, noise, preds[i])
        for i, y in enumerate(labels)
        if y == preds[i]
    ]
    result = []
    test_preds = net(test.double()).argmax(dim=1).tolist()
    for h, pred in zip(_features(net, test.double()), test_preds, strict=True):
        g = naive_gradient(h, prototypes, noise, pred)
        distances = sorted(float(((g - b) ** 2).sum()) for b in bank)
        result.append(-distances[k - 1])
    return torch.tensor(result, dtype=torch.float64)


def _data(dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    net = make_net(dtype=dtype, seed=seed)
    calib = torch.rand(40, 1, 4, 4, generator=generator).to(dtype)
    test = torch.rand(8, 1, 4, 4, generator=generator).to(dtype)
    with torch.no_grad():
        labels = net(calib).argmax(dim=1)
    labels[::3] = (labels[::3] + 1) % 3  # some misclassified: not indexed
    labels[-6:] = -1  # OoD samples, for the noise prototype
    return net, calib, test, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("k", "n_noise"), [(1, 100), (3, 4)])
def test_grood_matches_naive(dtype: torch.dtype, k: int, n_noise: int) -> None:
    net, calib, test, labels = _data(dtype)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    score = GROOD(k=k, n_noise_samples=n_noise).fit(rnet, calib, labels)
    out, conformity = score(test)
    with torch.no_grad():
        assert torch.equal(out, net(test))
    assert conformity.dtype == dtype and conformity.shape == (8, 3)
    expected = naive_grood(net, calib, labels.tolist(), test, k, n_noise)
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    scale = float(expected.abs().max())
    torch.testing.assert_close(conformity[:, 0].double(), expected, rtol=tol, atol=tol * scale)


def test_variants_on_naive_quantities() -> None:
    net, calib, test, labels = _data(torch.float64, seed=1)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    ind = labels >= 0
    feats = _features(net, calib)
    prototypes = [
        feats[labels == c].mean(dim=0) if (labels == c).any() else torch.zeros(8).double()
        for c in range(3)
    ]
    proto_mean = sum(prototypes) / 3
    score = GROOD(use_proto_mean=True, no_gradients=True).fit(rnet, calib, labels)
    torch.testing.assert_close(score.noise_prototype, proto_mean)
    h = _features(net, test)
    torch.testing.assert_close(score(test)[1][:, 0], (h - proto_mean).norm(dim=1))
    noise = feats[~ind].mean(dim=0)
    score = GROOD(use_grad_norm=True).fit(rnet, calib, labels)
    preds = net(test).argmax(dim=1)
    norms = [
        -float(naive_gradient(x, prototypes, noise, int(p)).abs().sum()) for x, p in zip(h, preds)
    ]
    torch.testing.assert_close(score(test)[1][:, 0], torch.tensor(norms, dtype=torch.float64))
    assert score.index is None


def test_sampling_ratio_keeps_evenly_spread_positions() -> None:
    assert kept_positions(10, 1.0, torch.device("cpu")).all()
    assert kept_positions(10, 0.5, torch.device("cpu")).nonzero().flatten().tolist() == [
        1,
        3,
        5,
        7,
        9,
    ]
    assert kept_positions(7, 0.3, torch.device("cpu")).nonzero().flatten().tolist() == [3, 6]
    net, calib, _, labels = _data(torch.float64, seed=2)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    score = GROOD(sampling_ratio=0.5).fit(rnet, calib, labels)
    kept = kept_positions(40, 0.5, torch.device("cpu")) & (labels >= 0)
    feats = _features(net, calib)
    for c in range(3):
        torch.testing.assert_close(score.prototypes[c], feats[kept & (labels == c)].mean(dim=0))
    correct = kept & (labels == net(calib).argmax(dim=1))
    assert score.index.ntotal == int(correct.sum())


def test_labels_and_ood_prototype() -> None:
    net, calib, _, labels = _data(torch.float32)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    bad = labels.clone()
    bad[0] = -2
    with pytest.raises(
        ValueError, match=r"`calib_labels` values must lie in \[0, 3\).*or -1 for OoD"
    ):
        GROOD().fit(rnet, calib, bad)
    with pytest.raises(ValueError, match="GROOD needs `calib_labels`"):
        GROOD().fit(rnet, calib)
    with pytest.warns(UserWarning, match="the OoD prototype is the origin"):
        score = GROOD().fit(rnet, calib, labels.clamp(min=0))
    assert torch.equal(score.noise_prototype, torch.zeros(8))
    with pytest.raises(ValueError, match=r"`k` must not exceed the \d+ correctly classified"):
        GROOD(k=30).fit(rnet, calib, labels)


def test_tensor_and_loader_fits_agree_and_save_load(tmp_path: Path) -> None:
    net, calib, test, labels = _data(torch.float32, seed=3)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    one = GROOD(k=2).fit(rnet, calib, labels)
    streamed = GROOD(k=2).fit(rnet, DataLoader(TensorDataset(calib, labels), batch_size=7))
    torch.testing.assert_close(streamed.prototypes, one.prototypes, rtol=0, atol=0)
    torch.testing.assert_close(streamed.index.samples, one.index.samples, rtol=0, atol=0)
    torch.testing.assert_close(streamed(test)[1], one(test)[1], rtol=0, atol=0)
    one.save(tmp_path / "grood.pt")
    loaded = scio.load_score(tmp_path / "grood.pt", net)
    assert loaded.params == one.params
    torch.testing.assert_close(loaded(test)[1], one(test)[1], rtol=0, atol=0)


def test_parameter_checks() -> None:
    cases = [
        ({"k": 0}, r"`k` must be a positive integer \(got 0\)"),
        ({"k": 1.5}, r"`k` must be a positive integer \(got 1.5\)"),
        ({"n_noise_samples": "100"}, r"`n_noise_samples` must be a positive integer"),
        ({"sampling_ratio": 0.0}, r"`sampling_ratio` must lie in \(0, 1\] \(got 0.0\)"),
        ({"sampling_ratio": math.nan}, r"`sampling_ratio` must lie in \(0, 1\]"),
        ({"use_val_ood": 1}, r"`use_val_ood` must be a bool \(got 1\)"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            GROOD(**params)
    score = GROOD()
    assert (score.k, score.n_noise_samples, score.sampling_ratio) == (1, 100, 1.0)  # OpenOOD
    assert score.use_val_ood and not (score.use_proto_mean or score.no_gradients)
