"""RankFeat against a naive float64 computation (rank-1 term from an eigendecomposition)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tests.conftest import make_net
from torch import Tensor, nn

import scio
from scio.models import fmnist
from scio.recorder import Recorder
from scio.scores import RankFeat
from scio.scores.classification.rankfeat import gram_rank1, power_iteration_rank1, remove_rank1


def naive_rank1(matrix: Tensor) -> Tensor:
    """``σ₁ u₁ v₁ᵀ`` of a float64 ``(C, L)`` matrix from the top eigenpair of the symmetric
    ``[[0, M], [Mᵀ, 0]]`` (eigenvalue ``σ₁``, eigenvector ``(u₁, v₁) / √2``)."""
    c, length = matrix.shape
    augmented = torch.zeros(c + length, c + length, dtype=torch.float64)
    augmented[:c, c:] = matrix
    augmented[c:, :c] = matrix.T
    values, vectors = torch.linalg.eigh(augmented)
    top = vectors[:, -1] * 2**0.5
    return values[-1] * torch.outer(top[:c], top[c:])


def naive_removed(maps: Tensor) -> Tensor:
    return torch.stack([m - naive_rank1(m.reshape(len(m), -1)).reshape(m.shape) for m in maps])


def naive_rankfeat(net: nn.Module, x: Tensor, temperature: float) -> Tensor:
    """TinyConvNet with A = softplus maps, B = pooled maps."""
    net = copy.deepcopy(net).double()
    with torch.no_grad():
        a = net.softplus(net.conv(x.double()))
        b = net.pool(a)
        logits_b = net.fc(net.flatten(naive_removed(b)))
        logits_a = net.fc(net.flatten(net.pool(naive_removed(a))))
    fused = ((logits_a + logits_b) / 2).tolist()
    return torch.tensor(
        [
            temperature
            * torch.tensor(row, dtype=torch.float64).div(temperature).logsumexp(0).item()
            for row in fused
        ],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_rankfeat_matches_naive(dtype: torch.dtype, temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    net = make_net(n_channels=3, size=6, dtype=dtype, seed=2)  # A: (4, 36), B: (4, 9)
    x = torch.rand(6, 3, 6, 6, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=x[:1])
    rnet.record((1, 2), (1, 3))
    score = RankFeat(temperature=temperature).fit(rnet, x)
    out, conformity = score(x)
    with torch.no_grad():
        assert torch.equal(out, net(x))
    assert conformity.dtype == dtype and conformity.shape == (6, 3)
    expected = naive_rankfeat(net, x, temperature)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(conformity[:, 0].double(), expected, rtol=tol, atol=tol)
    assert rnet._tail.splits  # the shaped forwards reran only the tail


def test_power_iteration_converges_to_the_exact_rank1_term() -> None:
    generator = torch.Generator().manual_seed(3)
    u = torch.randn(5, 8, 1, generator=generator, dtype=torch.float64)
    v = torch.randn(5, 1, 12, generator=generator, dtype=torch.float64)
    noise = 0.05 * torch.randn(5, 8, 12, generator=generator, dtype=torch.float64)
    maps = 3 * u @ v + noise  # a clear spectral gap
    exact = torch.stack([naive_rank1(m) for m in maps])
    torch.testing.assert_close(power_iteration_rank1(maps), exact, rtol=1e-6, atol=1e-6)
    again = remove_rank1(maps, accelerate=True)
    torch.testing.assert_close(again, maps - exact, rtol=1e-6, atol=1e-6)
    assert torch.equal(remove_rank1(maps, accelerate=True), again)  # seeded: deterministic


@pytest.mark.parametrize("shape", [(4, 7, 20), (4, 20, 7)])  # X Xᵀ, then Xᵀ X
def test_gram_rank1_is_the_top_singular_term(shape: tuple[int, int, int]) -> None:
    generator = torch.Generator().manual_seed(5)
    maps = torch.randn(*shape, generator=generator, dtype=torch.float64)
    maps[0] = 0  # a zero map has a zero term
    expected = torch.stack([naive_rank1(m) if m.any() else m for m in maps])
    torch.testing.assert_close(gram_rank1(maps), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gram_rank1(maps.float()), expected.float(), rtol=1e-5, atol=1e-5)


def test_non_finite_maps_do_not_raise() -> None:
    maps = torch.rand(3, 2, 2, 2)
    maps[1, 0, 0, 0] = float("nan")
    removed = remove_rank1(maps)
    assert removed[1].isnan().all()
    torch.testing.assert_close(removed[[0, 2]], remove_rank1(maps[[0, 2]]))


@pytest.mark.slow  # the embedded Fashion-MNIST model
def test_fashion_mnist_last_two_blocks_split_and_save_load(tmp_path: Path) -> None:
    net = fmnist()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    rnet = Recorder(net, input_data=x[:1])
    rnet.record("block3", "block4")
    score = RankFeat().fit(rnet, x)
    _, conformity = score(x)
    assert rnet._tail.splits
    with torch.no_grad():
        a = net.block3(net.block2(net.pool1(net.block1(x))))
        b = net.block4(net.pool2(a))
        head = lambda maps: net.fc(torch.flatten(net.avgpool(maps), 1))  # noqa: E731
        fused = (head(remove_rank1(b)) + head(net.block4(net.pool2(remove_rank1(a))))) / 2
    torch.testing.assert_close(conformity[:, 0], torch.logsumexp(fused, dim=1))
    score.save(tmp_path / "rankfeat.pt")
    loaded = scio.load_score(tmp_path / "rankfeat.pt", net)
    torch.testing.assert_close(loaded(x)[1], conformity, rtol=0, atol=0)


def test_layer_checks_and_parameters() -> None:
    net = make_net()
    x = torch.rand(3, 1, 4, 4)
    rnet = Recorder(net, input_data=x[:1])
    rnet.record((1, 2))
    with pytest.raises(ValueError, match="RankFeat needs exactly two recorded layers"):
        RankFeat().fit(rnet, x)(x)
    rnet.record((1, 2), (1, 4))
    with pytest.raises(ValueError, match=r"recorded layer #1 outputs shape \(3, 8\)"):
        RankFeat().fit(rnet, x)(x)
    for bad in (0.0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
            RankFeat(temperature=bad)
    with pytest.raises(ValueError, match=r"`accelerate` must be a bool \(got 1\)"):
        RankFeat(accelerate=1)
    assert (RankFeat().temperature, RankFeat().accelerate) == (1.0, False)  # OpenOOD's
