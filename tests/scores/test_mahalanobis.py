"""DeepMahalanobis / RelativeMahalanobis against naive float64 loops (numpy inverses)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification import deepmahalanobis as dm_module
from scio.scores.classification.deepmahalanobis import DeepMahalanobis
from scio.scores.classification.relativemahalanobis import RelativeMahalanobis

LAYERS = ((1, 3), (1, 5))
N_CLASSES = 3
TOL = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}


def _data(dtype: torch.dtype, n: int = 60, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    calib = torch.rand(n, 1, 4, 4, generator=generator).to(dtype)
    labels = torch.randint(0, 2, (n,), generator=generator)  # class 2 absent
    test = torch.rand(7, 1, 4, 4, generator=generator).to(dtype)
    return calib, labels, test


def _features(rnet: Recorder, x: Tensor, act_norm: float | None) -> list[np.ndarray]:
    """Per-layer flattened features in float64, normalised with plain numpy (and rounded
    back to the network's dtype, like the features the score sees)."""
    with torch.no_grad():
        rnet(x)
    result = []
    for act in rnet.activations.values():
        feats = act.double().flatten(1).numpy()
        if act_norm is not None:
            feats = feats / np.linalg.norm(feats, ord=act_norm, axis=1, keepdims=True)
            feats = torch.from_numpy(feats).to(act.dtype).double().numpy()
        result.append(feats)
    return result


def _pooled_cov(feats: np.ndarray, labels: np.ndarray) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Class means and pooled within-class covariance with explicit loops."""
    means = {c: feats[labels == c].mean(axis=0) for c in np.unique(labels)}
    d = feats.shape[1]
    scatter = np.zeros((d, d))
    for x, y in zip(feats, labels, strict=True):
        r = x - means[int(y)]
        scatter += np.outer(r, r)
    return means, scatter / (len(feats) - 1)


def _quad(x: np.ndarray, mu: np.ndarray, precision: np.ndarray) -> float:
    r = x - mu
    return float(r @ precision @ r)


def _naive(
    calib_feats: list[np.ndarray],
    labels: np.ndarray,
    test_feats: list[np.ndarray],
    *,
    relative: bool,
    weights: tuple[float, ...] | None = None,
    inverse: Callable[[np.ndarray], np.ndarray] = np.linalg.inv,
) -> np.ndarray:
    n_test = len(test_feats[0])
    total = np.zeros((n_test, N_CLASSES))
    for layer, (feats, tests) in enumerate(zip(calib_feats, test_feats, strict=True)):
        w = 1.0 if weights is None else weights[layer]
        means, cov = _pooled_cov(feats, labels)
        precision = inverse(cov)
        if relative:
            mu0 = feats.mean(axis=0)
            precision0 = inverse(np.cov(feats - mu0, rowvar=False))
        for i, x in enumerate(tests):
            for c in range(N_CLASSES):
                if c not in means:
                    total[i, c] = math.nan
                    continue
                value = _quad(x, means[c], precision)
                if relative:
                    value -= _quad(x, mu0, precision0)
                total[i, c] += w * value
    return np.where(np.isnan(total), -np.inf, -total)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [DeepMahalanobis, RelativeMahalanobis])
@pytest.mark.parametrize(("act_norm", "weights"), [(None, None), (2.0, (0.5, 2.0))])
def test_matches_naive(
    dtype: torch.dtype,
    cls: type[DeepMahalanobis],
    act_norm: float | None,
    weights: tuple[float, ...] | None,
) -> None:
    calib, labels, test = _data(dtype)
    net = make_net(dtype=dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = cls(act_norm=act_norm, weights=weights).fit(rnet, calib, labels)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (7, N_CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(out, net(test))
    expected = _naive(
        _features(rnet, calib, act_norm),
        labels.numpy(),
        _features(rnet, test, act_norm),
        relative=cls is RelativeMahalanobis,
        weights=weights,
    )
    assert torch.equal(conformity[:, 2], torch.full((7,), -math.inf, dtype=dtype))
    tol = TOL[dtype]
    np.testing.assert_allclose(conformity.double().numpy(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(("cls", "epsilon"), [(DeepMahalanobis, 0.0), (RelativeMahalanobis, 0.02)])
def test_dataloader_equals_tensor(cls: type[DeepMahalanobis], epsilon: float) -> None:
    calib, labels, test = _data(torch.float64)
    rnet = Recorder(make_net(dtype=torch.float64), input_data=calib[[0]])
    rnet.record(*LAYERS)
    whole = cls(epsilon=epsilon).fit(rnet, calib, labels)
    loader = DataLoader(TensorDataset(calib, labels), batch_size=7)
    batched = cls(epsilon=epsilon).fit(rnet, loader)
    for attr in cls._fitted_attrs:
        for a, b in zip(getattr(whole, attr), getattr(batched, attr), strict=True):
            torch.testing.assert_close(a, b, equal_nan=True)
    torch.testing.assert_close(whole(test)[1], batched(test)[1])


def _compute_mahalanobis_naive(x: np.ndarray, mu: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.array([[_quad(xi, mj, p) for mj in mu] for xi in x])


@pytest.mark.parametrize("dtype", DTYPES)
def test_compute_mahalanobis(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    mu = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    mu[1] = math.nan
    a = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    precision = a @ a.T + torch.eye(4, dtype=torch.float64)
    expected = _compute_mahalanobis_naive(x.numpy(), mu.numpy(), precision.numpy())
    pairs = DeepMahalanobis.compute_mahalanobis(x.to(dtype), mu.to(dtype), precision.to(dtype))
    assert pairs.dtype == dtype
    assert pairs.shape == (6, 3)
    tol = TOL[dtype] * 10
    np.testing.assert_allclose(pairs.double().numpy(), expected, rtol=tol, atol=tol)
    rowwise = DeepMahalanobis.compute_mahalanobis(
        x.to(dtype), mu[[0, 2, 0, 2, 0, 2]].to(dtype), precision.to(dtype), product=False
    )
    assert rowwise.shape == (6,)
    expected_rowwise = expected[np.arange(6), [0, 2, 0, 2, 0, 2]]
    np.testing.assert_allclose(rowwise.double().numpy(), expected_rowwise, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compute_precision(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    residues = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    precision = DeepMahalanobis.compute_precision(residues.to(dtype))
    assert precision.dtype == dtype
    expected = np.linalg.inv(np.cov(residues.to(dtype).double().numpy(), rowvar=False))
    tol = TOL[dtype] * 10
    np.testing.assert_allclose(precision.double().numpy(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compute_precision_singular(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    residues = torch.randn(30, 3, generator=generator, dtype=torch.float64)
    duplicated = torch.cat([residues, residues[:, :1]], dim=1).to(dtype)
    for singular in (duplicated, torch.zeros(10, 4, dtype=dtype), residues[:3].to(dtype)):
        precision = DeepMahalanobis.compute_precision(singular)
        assert precision.dtype == dtype
        assert precision.shape == (singular.shape[1],) * 2
        assert precision.isnan().all()
    infinite = residues.clone().to(dtype)
    infinite[0, 0] = math.inf
    assert DeepMahalanobis.compute_precision(infinite).isnan().all()


@pytest.mark.parametrize("cls", [DeepMahalanobis, RelativeMahalanobis])
def test_singular_covariance_uses_pseudo_inverse(cls: type[DeepMahalanobis]) -> None:
    # 20 samples of a 32-dimensional layer: the covariance has rank <= 19.
    calib, labels, test = _data(torch.float64, n=20)
    rnet = Recorder(make_net(dtype=torch.float64), input_data=calib[[0]])
    rnet.record((1, 2), (1, 5))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        score = cls().fit(rnet, calib, labels)
    messages = [str(w.message) for w in rec if w.category is UserWarning]
    # Pooled within-class covariance of 2 classes: rank 20 - 2; background: rank 20 - 1.
    expected_messages = [("Singular covariance matrix at layer (1, 2)", 18)]
    if cls is RelativeMahalanobis:
        expected_messages.append(("Singular background covariance matrix at layer (1, 2)", 19))
    assert len(messages) == len(expected_messages)
    for message, (start, rank) in zip(messages, expected_messages, strict=True):
        assert message.startswith(start)
        assert message.endswith(f"(numerical rank {rank} < dimension 32): using its pseudo-inverse")
    _, conformity = score(test)
    assert conformity[:, :2].isfinite().all()

    def pinv(cov: np.ndarray) -> np.ndarray:
        return np.linalg.pinv(cov, rcond=1e-10, hermitian=True)

    expected = _naive(
        _features(rnet, calib, None),
        labels.numpy(),
        _features(rnet, test, None),
        relative=cls is RelativeMahalanobis,
        inverse=pinv,
    )
    np.testing.assert_allclose(conformity.numpy(), expected, rtol=1e-6, atol=1e-6)
    # The precision used is the pseudo-inverse.
    feats = _features(rnet, calib, None)[0]
    _, cov = _pooled_cov(feats, labels.numpy())
    np.testing.assert_allclose(score.precisions[0].numpy(), pinv(cov), rtol=1e-6, atol=1e-6)


def test_single_sample_gives_minus_inf() -> None:
    calib, labels, test = _data(torch.float32, n=1)
    rnet = Recorder(make_net(), input_data=calib[[0]])
    rnet.record((1, 5))
    with pytest.warns(UserWarning, match=r"Non-finite covariance matrix at layer \(1, 5\)"):
        score = DeepMahalanobis().fit(rnet, calib, labels)
    _, conformity = score(test)
    assert torch.equal(conformity, torch.full_like(conformity, -math.inf))


def _naive_perturbed(
    rnet: Recorder, calib: Tensor, labels: Tensor, test: Tensor, epsilon: float, *, relative: bool
) -> np.ndarray:
    """Per-sample, per-layer input perturbation with autograd on a naive float64 formula."""
    calib_feats = _features(rnet, calib, None)
    total = np.zeros((len(test), N_CLASSES))
    for depth_idx, feats in zip(rnet.recorded_modules, calib_feats, strict=True):
        means_np, cov = _pooled_cov(feats, labels.numpy())
        means = {c: torch.from_numpy(mu) for c, mu in means_np.items()}
        precision = torch.from_numpy(np.linalg.inv(cov))
        mu0 = torch.from_numpy(feats.mean(axis=0))
        precision0 = torch.from_numpy(np.linalg.inv(np.cov(feats - feats.mean(0), rowvar=False)))

        def dist(
            z: Tensor, c: int, means: dict[int, Tensor] = means, precision: Tensor = precision
        ) -> Tensor:
            value = (z - means[c]) @ precision @ (z - means[c])
            if relative:
                value = value - (z - mu0) @ precision0 @ (z - mu0)  # noqa: B023
            return value

        for i in range(len(test)):
            x = test[i : i + 1].clone().requires_grad_()
            rnet(x)
            z = rnet.activations[depth_idx].flatten()
            candidate = min(means, key=lambda c: float(dist(z.detach(), c)))
            (grad,) = torch.autograd.grad(-dist(z, candidate), x)
            x_adv = x.detach() + epsilon * grad.sign()
            with torch.no_grad():
                rnet(x_adv)
                z_adv = rnet.activations[depth_idx].flatten()
                for c in range(N_CLASSES):
                    total[i, c] += float(dist(z_adv, c)) if c in means else math.nan
    return np.where(np.isnan(total), -np.inf, -total)


@pytest.mark.parametrize("cls", [DeepMahalanobis, RelativeMahalanobis])
def test_input_perturbation_matches_naive(cls: type[DeepMahalanobis]) -> None:
    calib, labels, test = _data(torch.float64)
    net = make_net(dtype=torch.float64)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = cls(epsilon=0.05).fit(rnet, calib, labels)
    test.requires_grad_(False)
    before = test.clone()
    out, conformity = score(test)
    assert not out.requires_grad
    assert not test.requires_grad and test.grad is None
    assert torch.equal(test, before)
    with torch.no_grad():
        torch.testing.assert_close(out, net(test))
    expected = _naive_perturbed(
        rnet, calib, labels, test, 0.05, relative=cls is RelativeMahalanobis
    )
    np.testing.assert_allclose(conformity.numpy(), expected, rtol=1e-8, atol=1e-8)
    # A perturbation that decreases the distance increases the conformity of the best class.
    clean = score.__class__().fit(rnet, calib, labels)(test)[1]
    assert (conformity.amax(dim=1) > clean.amax(dim=1)).all()


def test_caller_input_untouched_with_grad_flag() -> None:
    calib, labels, test = _data(torch.float32)
    rnet = Recorder(make_net(), input_data=calib[[0]])
    rnet.record(*LAYERS)
    calib_before = calib.clone()
    score = DeepMahalanobis(epsilon=0.01, fgm_norm=2.0).fit(rnet, calib, labels)
    assert torch.equal(calib, calib_before) and not calib.requires_grad
    leaf = test.clone().requires_grad_()
    _, conformity = score(leaf)
    assert leaf.requires_grad and leaf.grad is None
    assert torch.equal(leaf.detach(), test)
    assert not conformity.isnan().any()


def test_perturbation_failure_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    calib, labels, test = _data(torch.float64)
    rnet = Recorder(make_net(dtype=torch.float64), input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = DeepMahalanobis(epsilon=0.05).fit(rnet, calib, labels)

    def failing(grad: Tensor, **_: object) -> Tensor:
        raise ValueError("Only finite gradients are allowed")

    monkeypatch.setattr(dm_module, "fgm_direction", failing)
    with pytest.warns(UserWarning, match="adversarial perturbation") as rec:
        _, conformity = score(test)
    messages = [str(w.message) for w in rec]
    assert len(messages) == 2
    for message, layer in zip(messages, LAYERS, strict=True):
        assert message.startswith(
            f"Error during the computation of adversarial perturbation at layer {layer}"
        )
        assert message.endswith("Continuing without adversarial reinforcement")
    score.epsilon = 0.0
    torch.testing.assert_close(conformity, score(test)[1])


def test_params_checks_and_fit_persistence() -> None:
    calib, labels, test = _data(torch.float32)
    rnet = Recorder(make_net(), input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = DeepMahalanobis()
    assert repr(score) == (
        "DeepMahalanobis[unfit](act_norm=None, mode='raw', epsilon=0.0, fgm_norm=inf, weights=None)"
    )
    assert str(RelativeMahalanobis()) == "RelativeMahalanobis()"
    with pytest.raises(AssertionError):
        DeepMahalanobis(fgm_norm=0.5).fit(rnet, calib, labels)
    score.fit(rnet, calib, labels)
    reference = score(test)[1]
    score.epsilon = 0.01
    score.fgm_norm = 2.0
    score.weights = [2.0, 0.0]
    assert score.is_fit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score(test)
    score.epsilon = 0.0
    _, weighted = score(test)
    single = DeepMahalanobis().fit(rnet, calib, labels)
    rnet.record(LAYERS[0])
    torch.testing.assert_close(weighted[:, :2], 2 * single(test)[1][:, :2])
    rnet.record(*LAYERS)
    score.weights = [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"one value per recorded layer \(2\) \(got 3\)"):
        score(test)
    score.weights = None
    torch.testing.assert_close(score(test)[1], reference)
    with pytest.raises(AssertionError, match=r"`fgm_norm` of DeepMahalanobis must be .*>= 1"):
        score.fgm_norm = 0.5  # checked at assignment (docs/errors.md): the score is unchanged
    assert score.fgm_norm == 2.0
    assert score.is_fit
    score.act_norm = 2.0
    assert not score.is_fit


@pytest.mark.parametrize("cls", [DeepMahalanobis, RelativeMahalanobis])
def test_bad_labels(cls: type[DeepMahalanobis]) -> None:
    calib, labels, _ = _data(torch.float32, n=20)
    rnet = Recorder(make_net(), input_data=calib[[0]])
    rnet.record((1, 5))
    with pytest.raises(ValueError, match="shape"):
        cls().fit(rnet, calib, labels[:-1])
    with pytest.raises(ValueError, match="integer dtype"):
        cls().fit(rnet, calib, labels.float())
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cls().fit(rnet, calib, labels + 2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cls().fit(rnet, calib, labels - 1)
    loader = DataLoader(TensorDataset(calib, labels + 2), batch_size=7)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cls().fit(rnet, loader)


def test_overflowing_gradient_is_rescaled(monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 with an ill-conditioned covariance: the plain input gradient overflows; the
    per-sample rescaled objective gives the (scale-invariant) FGM direction instead."""
    generator = torch.Generator().manual_seed(0)
    calib = torch.rand(40, 1, 4, 4, generator=generator).to(torch.float16)
    labels = torch.randint(0, 2, (40,), generator=generator)
    test = torch.rand(8, 1, 4, 4, generator=generator).to(torch.float16)
    rnet = Recorder(make_net(dtype=torch.float16), input_data=calib[[0]])
    rnet.record((1, 2), (1, 4))
    finite: list[bool] = []
    original = dm_module._rescaled_grad

    def spy(objective: Tensor, z: Tensor, x: Tensor) -> Tensor:
        grad = original(objective, z, x)
        finite.append(bool(grad.isfinite().all()))
        return grad

    monkeypatch.setattr(dm_module, "_rescaled_grad", spy)
    score = DeepMahalanobis(epsilon=0.01, act_norm=2.0).fit(rnet, calib, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, conformity = score(test)
    assert finite == [True]
    score.epsilon = 0.0
    clean = score(test)[1]
    assert (conformity[:, :2] > clean[:, :2]).all()


def test_rescaled_gradient_has_the_same_direction() -> None:
    calib, labels, test = _data(torch.float64)
    rnet = Recorder(make_net(dtype=torch.float64), input_data=calib[[0]])
    rnet.record(*LAYERS)
    score = DeepMahalanobis().fit(rnet, calib, labels)
    x = test.clone().requires_grad_()
    rnet(x)
    z = score.activations()[0].flatten(1)
    objective = -score._candidate_d2(0, z, torch.zeros(len(x), dtype=torch.int64))
    (plain,) = torch.autograd.grad(objective.sum(), x, retain_graph=True)
    rescaled = dm_module._rescaled_grad(objective, z, x)
    assert torch.equal(plain.sign(), rescaled.sign())
    ratios = (plain / rescaled).flatten(1)
    torch.testing.assert_close(ratios, ratios[:, :1].expand_as(ratios))
