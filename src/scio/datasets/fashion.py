"""Fashion-MNIST (official 60k/10k split) from the Debian package ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from scio.datasets._base import DatasetNotFoundError, ImageDataset, select_indices, to_images

__all__ = [
    "FASHION_MNIST_DIR",
    "FMNIST_CALIBRATION_SIZE",
    "FMNIST_CLASSES",
    "fashion_mnist",
    "fashion_mnist_calibration_split",
    "fashion_mnist_dir",
]

FMNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Default location (Debian/Ubuntu package); override with ``$SCIO_FASHION_MNIST_DIR``."""
FMNIST_CALIBRATION_SIZE = 5000
"""The last 5,000 images of the official training file are held out for calibration."""
_N_TRAIN = 60_000
_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

Split = Literal["train", "test", "fit", "calibration"]


def fashion_mnist_dir() -> Path:
    """Folder holding the four IDX gzip files; raises :class:`DatasetNotFoundError` if absent."""
    folder = Path(os.environ.get("SCIO_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    missing = [f for pair in _FILES.values() for f in pair if not (folder / f).is_file()]
    if missing:
        msg = (
            f"Fashion-MNIST files {missing} not found in {folder}. Install the Debian package "
            f"with: {_INSTALL} (or point $SCIO_FASHION_MNIST_DIR to a folder holding them)"
        )
        raise DatasetNotFoundError(msg)
    return folder


@lru_cache(maxsize=4)
def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip'd IDX file of unsigned bytes (magic 0x00 0x00 0x08 ndim, big-endian dims)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        msg = f"{path} is not an IDX file of unsigned bytes"
        raise ValueError(msg)
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    arr = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        msg = f"{path}: expected {shape} bytes of data, got {arr.size}"
        raise ValueError(msg)
    return arr.reshape(shape)


def fashion_mnist_calibration_split() -> tuple[Tensor, Tensor]:
    """Indices into the official training split: ``(fit, calibration)``.

    Rule: calibration = the last :data:`FMNIST_CALIBRATION_SIZE` images (indices 55,000 to
    59,999, ~500 per class); fit = indices 0 to 54,999. The shipped models never saw the
    calibration images; the test split is never used for calibration.
    """
    cut = _N_TRAIN - FMNIST_CALIBRATION_SIZE
    return torch.arange(cut), torch.arange(cut, _N_TRAIN)


def _class_ids(classes: Sequence[str | int]) -> list[int]:
    ids = []
    for c in classes:
        if isinstance(c, str):
            if c not in FMNIST_CLASSES:
                msg = f"unknown Fashion-MNIST class {c!r}; choose from {FMNIST_CLASSES}"
                raise ValueError(msg)
            ids.append(FMNIST_CLASSES.index(c))
        elif 0 <= c < len(FMNIST_CLASSES):
            ids.append(int(c))
        else:
            msg = f"Fashion-MNIST class index out of range: {c}"
            raise ValueError(msg)
    if len(set(ids)) != len(ids):
        msg = f"duplicate classes in {classes}"
        raise ValueError(msg)
    return ids


def fashion_mnist(
    split: Split = "train",
    *,
    n: int | None = None,
    seed: int = 0,
    classes: Sequence[str | int] | None = None,
    relabel: bool = False,
) -> ImageDataset:
    """Fashion-MNIST images ``(n, 1, 28, 28)`` float32 in [0, 1] and int64 labels.

    Args:
        split: ``"train"`` (60,000), ``"test"`` (10,000), or the two parts of ``"train"``
            given by :func:`fashion_mnist_calibration_split`: ``"fit"`` (55,000) and
            ``"calibration"`` (5,000).
        n: number of images drawn without replacement (seeded, random order); ``None``
            keeps all, in file order.
        seed: seed of the draw.
        classes: keep only these classes (names or indices), before drawing ``n``.
        relabel: with ``classes``, relabel to ``0..len(classes)-1`` in the given order and
            set ``.classes`` to the kept names; otherwise labels stay Fashion-MNIST indices.
    """
    if split not in ("train", "test", "fit", "calibration"):
        msg = f"split must be 'train', 'test', 'fit' or 'calibration', got {split!r}"
        raise ValueError(msg)
    folder = fashion_mnist_dir()
    images_file, labels_file = _FILES["test" if split == "test" else "train"]
    images = _read_idx(folder / images_file)
    labels = torch.from_numpy(_read_idx(folder / labels_file).astype(np.int64))
    pool = torch.arange(len(labels))
    if split in ("fit", "calibration"):
        pool = fashion_mnist_calibration_split()[split == "calibration"]
    names = FMNIST_CLASSES
    if classes is not None:
        ids = _class_ids(classes)
        pool = pool[torch.isin(labels[pool], torch.tensor(ids))]
        if relabel:
            mapping = torch.full((len(FMNIST_CLASSES),), -1, dtype=torch.int64)
            mapping[ids] = torch.arange(len(ids))
            labels = mapping[labels]
            names = tuple(FMNIST_CLASSES[i] for i in ids)
    elif relabel:
        msg = "relabel=True needs classes"
        raise ValueError(msg)
    idx = pool[select_indices(len(pool), n, seed)]
    return ImageDataset(to_images(images, idx), labels[idx], names, f"fashion-mnist-{split}")
