"""The embedded Fashion-MNIST models: weights, accuracy, fx tracing, torch.hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import scio.datasets as D
import scio.models
from scio.models import (
    FMNIST_CLASSES,
    FMNIST_NEAR_CLASS_IDS,
    FMNIST_NEAR_CLASSES,
    FMNIST_NEAR_OOD_CLASSES,
    FashionCNN,
    fmnist,
    fmnist_near,
    fmnist_near_targets,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = Path(scio.models.__file__).parent / "weights"
LOADERS = {"fmnist": (fmnist, 10), "fmnist_near": (fmnist_near, 8)}


def _fmnist_available() -> bool:
    try:
        D.fashion_mnist_dir()
    except D.DatasetNotFoundError:
        return False
    return True


needs_fmnist = pytest.mark.skipif(
    not _fmnist_available(),
    reason="Fashion-MNIST missing: apt-get update && apt-get install -y dataset-fashion-mnist",
)


@pytest.mark.parametrize("name", list(LOADERS))
def test_weights_load(name: str) -> None:
    loader, n_classes = LOADERS[name]
    assert (WEIGHTS / f"{name}.pt").stat().st_size < 1_000_000
    net = loader()
    assert isinstance(net, FashionCNN)
    assert not net.training
    assert net.fc.out_features == n_classes
    assert [n for n, _ in net.named_children()][-2:] == ["avgpool", "fc"]
    with torch.no_grad():
        out = net(torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (3, n_classes)
    assert torch.isfinite(out).all()


def test_class_mapping() -> None:
    assert FMNIST_NEAR_OOD_CLASSES == ("Shirt", "Ankle boot")
    assert len(FMNIST_NEAR_CLASSES) == 8
    assert set(FMNIST_NEAR_CLASSES).isdisjoint(FMNIST_NEAR_OOD_CLASSES)
    assert [FMNIST_CLASSES[i] for i in FMNIST_NEAR_CLASS_IDS] == list(FMNIST_NEAR_CLASSES)
    targets = fmnist_near_targets(torch.arange(10))
    assert targets.tolist() == [0, 1, 2, 3, 4, 5, -1, 6, 7, -1]


@needs_fmnist
def test_fmnist_accuracy() -> None:
    test = D.fashion_mnist("test", n=2000, seed=0)
    with torch.no_grad():
        acc = (fmnist()(test.data).argmax(1) == test.labels).float().mean().item()
    assert acc >= 0.90


@needs_fmnist
def test_fmnist_msp_separates_uniform_noise() -> None:
    """Max-softmax AUROC, Fashion-MNIST test (ID) vs uniform noise (OoD = positive) > 0.9."""
    test = D.fashion_mnist("test", n=1000, seed=0)
    noise = D.uniform_noise(1000, seed=0)
    net = fmnist()
    with torch.no_grad():
        msp_id = net(test.data).softmax(1).amax(1)
        msp_ood = net(noise.data).softmax(1).amax(1)
    # AUROC of the OoD score -msp: P(msp_ood < msp_id) + P(tie) / 2 over all pairs.
    lower = (msp_ood[:, None] < msp_id[None, :]).double().mean()
    ties = (msp_ood[:, None] == msp_id[None, :]).double().mean()
    assert (lower + ties / 2).item() > 0.9


@needs_fmnist
def test_fmnist_near_accuracy() -> None:
    test = D.fashion_mnist("test", n=2000, seed=0, classes=FMNIST_NEAR_CLASS_IDS)
    with torch.no_grad():
        preds = fmnist_near()(test.data).argmax(1)
    acc = (preds == fmnist_near_targets(test.labels)).float().mean().item()
    assert acc >= 0.90


@pytest.mark.parametrize("name", list(LOADERS))
def test_fx_traceable(name: str) -> None:
    net = LOADERS[name][0]()
    gm = torch.fx.symbolic_trace(net)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x))


@pytest.mark.parametrize("name", list(LOADERS))
def test_hub_load(name: str) -> None:
    net = torch.hub.load(str(REPO_ROOT), name, source="local")
    ref = LOADERS[name][0]()
    assert not net.training
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))


def test_untrained() -> None:
    assert fmnist(pretrained=False).fc.out_features == 10
    assert fmnist_near(pretrained=False).fc.out_features == 8
