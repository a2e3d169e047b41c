"""GMM against naive computations and scikit-learn's GaussianMixture, and its checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import scio
from scio.recorder import Recorder
from scio.scores import GMM
from scio.scores.classification.gmm import fit_tied_gmm, kmeans, layer_feature, pca_basis

PARAMS = {
    "num_clusters_list": (2, 3),
    "feature_type_list": ("stat", "flat"),
    "alpha_list": (0.5, 2.0),
    "reduce_dim_list": ("none", "pca_3"),
}


def _clusters(n: int, seed: int) -> Tensor:
    """Three well separated float64 clusters in 3-d, ``n`` points each."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 1.0], [0.0, 7.0, -2.0]])
    noise = torch.randn(3, n, 3, generator=generator) @ torch.tensor(
        [[1.0, 0.3, 0.0], [0.0, 0.8, 0.2], [0.0, 0.0, 0.5]]
    )
    return (centres[:, None] + noise).reshape(-1, 3).double()


def naive_log_density(y: list[float], log_w: Tensor, means: Tensor, chol: Tensor) -> float:
    precision = (chol @ chol.T).tolist()
    total = 0.0
    for lw, mu in zip(log_w.tolist(), means.tolist(), strict=True):
        diff = [a - b for a, b in zip(y, mu, strict=True)]
        maha = sum(
            diff[i] * precision[i][j] * diff[j] for i in range(len(y)) for j in range(len(y))
        )
        total += math.exp(lw - maha / 2)
    return math.log(total)


def test_layer_features_on_hand_made_maps() -> None:
    maps = torch.arange(24.0).reshape(2, 3, 2, 2) ** 1.5
    flat = layer_feature(maps, "flat")
    assert torch.equal(flat, maps.reshape(2, 12))
    stat = layer_feature(maps, "stat")
    for n in range(2):
        for c in range(3):
            values = maps[n, c].flatten().tolist()
            mean = sum(values) / 4
            assert stat[n, c] == pytest.approx(mean)
            assert stat[n, 3 + c] == pytest.approx(sum((v - mean) ** 2 for v in values) / 3)
    torch.testing.assert_close(layer_feature(maps, "mean"), stat[:, :3])
    pooled = maps.mean(dim=(2, 3), keepdim=True)  # one value per channel: its mean only
    torch.testing.assert_close(layer_feature(pooled, "stat"), pooled.reshape(2, 3))


@pytest.mark.parametrize("shape", [(40, 6), (5, 9)])  # covariance, then Gram path
def test_pca_basis_spans_the_principal_subspace(shape: tuple[int, int]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * torch.linspace(3.0, 0.5, shape[1], dtype=torch.float64)
    basis = pca_basis(x, 3)
    centred = (x - x.mean(dim=0)).numpy()
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = torch.from_numpy(vt[:3].T)
    signs = torch.sign(expected.gather(0, expected.abs().argmax(dim=0)[None]))
    torch.testing.assert_close(basis, expected * signs, rtol=1e-8, atol=1e-8)


def test_em_matches_scikit_learn_on_separated_clusters() -> None:
    mixture = pytest.importorskip("sklearn.mixture")
    x = _clusters(60, seed=1)
    log_w, means, chol = fit_tied_gmm(x, 3, seed=0)
    reference = mixture.GaussianMixture(3, covariance_type="tied", random_state=0).fit(x.numpy())
    order = torch.from_numpy(np.argsort(reference.means_[:, 0] * 10 + reference.means_[:, 1]))
    mine = torch.argsort(means[:, 0] * 10 + means[:, 1])
    expected_means = torch.from_numpy(reference.means_)[order]
    torch.testing.assert_close(means[mine], expected_means, atol=1e-6, rtol=1e-6)
    weights = torch.from_numpy(reference.weights_)[order]
    torch.testing.assert_close(log_w[mine].exp(), weights, atol=1e-6, rtol=1e-6)
    precision = torch.from_numpy(reference.precisions_)
    torch.testing.assert_close(chol @ chol.T, precision, atol=1e-6, rtol=1e-6)
    labels = kmeans(x, 3, seed=0)
    assert sorted(torch.bincount(labels).tolist()) == [60, 60, 60]


@pytest.mark.parametrize("seed", [0, 3])
def test_kmeans_and_em_follow_scikit_learn_draws_on_unclustered_data(seed: int) -> None:
    """No cluster structure: the optimum reached depends on the seeding, which is
    scikit-learn's (same RandomState calls), so labels and mixtures agree."""
    pytest.importorskip("sklearn")
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(150, 4, generator=generator, dtype=torch.float64)
    reference = KMeans(5, n_init=1, random_state=seed).fit(x.numpy())
    assert torch.equal(kmeans(x, 5, seed), torch.from_numpy(reference.labels_).long())
    log_w, means, chol = fit_tied_gmm(x, 5, seed)
    mixture = GaussianMixture(5, covariance_type="tied", random_state=seed).fit(x.numpy())
    torch.testing.assert_close(means, torch.from_numpy(mixture.means_), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        log_w.exp(), torch.from_numpy(mixture.weights_), rtol=1e-6, atol=1e-6
    )
    precision = torch.from_numpy(mixture.precisions_)
    torch.testing.assert_close(chol @ chol.T, precision, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gmm_matches_naive(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    net = make_net(dtype=dtype, seed=1)
    calib = torch.rand(40, 1, 4, 4, generator=generator).to(dtype)
    test = torch.rand(7, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 2), (1, 4))
    score = GMM(**PARAMS).fit(rnet, calib)
    out, conformity = score(test)
    assert conformity.dtype == dtype and conformity.shape == (7, 3)
    with torch.no_grad():
        maps = net.softplus(net.conv(test)).double()
        flat = net.flatten(net.pool(net.softplus(net.conv(test)))).double()
        assert torch.equal(out, net(test))
    expected = []
    for m, f in zip(maps, flat, strict=True):
        per_channel = m.reshape(2, -1)
        stat = [*per_channel.mean(dim=1).tolist(), *per_channel.var(dim=1).tolist()]
        projected = (f[None] @ score.transforms[1])[0].tolist()
        first = naive_log_density(stat, *(fitted[0] for fitted in _fitted(score)))
        second = naive_log_density(projected, *(fitted[1] for fitted in _fitted(score)))
        expected.append(0.5 * first + 2.0 * second)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    expected_t = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(conformity[:, 0].double(), expected_t, rtol=tol, atol=tol)
    # the fitted mixture of the pooled layer is EM on the PCA-projected calibration features
    with torch.no_grad():
        calib_flat = net.flatten(net.pool(net.softplus(net.conv(calib)))).double()
    basis = pca_basis(calib_flat, 3)
    torch.testing.assert_close(score.transforms[1], basis, rtol=1e-5, atol=1e-5)
    log_w, means, _ = fit_tied_gmm(calib_flat @ basis, 3, seed=0)
    torch.testing.assert_close(score.means[1], means, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(score.log_weights[1], log_w, rtol=1e-4, atol=1e-4)


def _fitted(score: GMM) -> tuple[tuple[Tensor | None, ...], ...]:
    return score.log_weights, score.means, score.precision_chols


def test_zero_weight_layers_are_not_fit_and_contribute_nothing() -> None:
    net = make_net(dtype=torch.float64)
    x = torch.rand(30, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rnet = Recorder(net, input_data=x[:1])
    rnet.record((1, 2), (1, 4))
    both = GMM(**{**PARAMS, "alpha_list": (0.0, 1.0)}).fit(rnet, x)
    assert both.means[0] is None and both.transforms[0] is None
    rnet_last = Recorder(net, input_data=x[:1])
    rnet_last.record((1, 4))
    last = GMM(
        num_clusters_list=(3,), feature_type_list=("flat",), alpha_list=(1.0,),
        reduce_dim_list=("pca_3",),
    ).fit(rnet_last, x)  # fmt: skip
    torch.testing.assert_close(both(x)[1], last(x)[1], rtol=0, atol=0)


def test_tensor_and_loader_fits_agree_and_save_load(tmp_path: Path) -> None:
    net = make_net()
    generator = torch.Generator().manual_seed(4)
    calib = torch.rand(40, 1, 4, 4, generator=generator)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 2), (1, 4))
    one = GMM(**PARAMS).fit(rnet, calib)
    loader = DataLoader(TensorDataset(calib, torch.zeros(40, dtype=torch.int64)), batch_size=7)
    streamed = GMM(**PARAMS).fit(rnet, loader)
    for name in GMM._fitted_attrs:
        for a, b in zip(getattr(one, name), getattr(streamed, name), strict=True):
            assert (a is None and b is None) or torch.equal(a, b), name
    one.save(tmp_path / "gmm.pt")
    loaded = scio.load_score(tmp_path / "gmm.pt", net)
    assert loaded.params == one.params
    torch.testing.assert_close(loaded(calib)[1], one(calib)[1], rtol=0, atol=0)


def test_parameter_and_layer_checks() -> None:
    cases = [
        ({"num_clusters_list": (0, 1, 2)}, r"`num_clusters_list` entries must be positive"),
        ({"feature_type_list": ("flat", "max", "mean")}, r"`feature_type_list` entries must be"),
        ({"alpha_list": (0.0, math.nan, 1.0)}, r"`alpha_list` entries must be finite numbers"),
        ({"reduce_dim_list": ("none", "pca_0", "none")}, r"`reduce_dim_list` entries must be"),
        ({"reduce_dim_list": ("lda_5",)}, r"`reduce_dim_list` entries must be 'none' or 'pca_K'"),
        ({"alpha_list": 1.0}, r"`alpha_list` must be a non-empty list"),
        ({"seed": 1.5}, r"`seed` must be an integer \(got 1.5\)"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            GMM(**params)
    net = make_net()
    x = torch.rand(10, 1, 4, 4)
    rnet = Recorder(net, input_data=x[:1])
    rnet.record((1, 4))
    with pytest.raises(ValueError, match=r"GMM has 3 entries per parameter list .* records 1"):
        GMM().fit(rnet, x)
    with pytest.raises(ValueError, match=r"must have one entry per recorded layer, so the same"):
        GMM(num_clusters_list=(2,)).fit(rnet, x)
    one_layer = {"feature_type_list": ("flat",), "alpha_list": (1.0,)}
    with pytest.raises(ValueError, match=r"`num_clusters_list\[0\]` = 20 exceeds the 10"):
        GMM(num_clusters_list=(20,), reduce_dim_list=("none",), **one_layer).fit(rnet, x)
    with pytest.raises(ValueError, match=r"`reduce_dim_list\[0\]` = 'pca_9' keeps more"):
        GMM(num_clusters_list=(2,), reduce_dim_list=("pca_9",), **one_layer).fit(rnet, x)
