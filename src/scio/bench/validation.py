"""Validation data of ``scio bench --tune``, disjoint from calibration and test data.

* **ID validation**: Fashion-MNIST test-split images that the protocol's test set does not
  use. The test set is the first ``n_test`` images of a seeded permutation of the test
  split (restricted to the protocol's classes); the validation slice is the next ``n_val``
  images of the **same** permutation, so the two never share an index. Calibration comes
  from the training file (its last 5,000 images), another file altogether.
* **Validation OoD**: none of the test OoD sets — the 200 images of scikit-image's LFW
  subset (100 faces, 100 non-faces, 25×25 upsampled to 28×28) and random patches of the
  bundled grayscale scenes ``camera, coins, moon, page, text, clock, cell`` (the test
  "Photos" and "Textures" sets use other images). The same set serves both protocols, as
  OpenOOD v1.5 uses one validation OoD set per benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from scio import datasets
from scio.datasets._base import ImageDataset, import_optional, select_indices
from scio.datasets.fashion import _FILES, _read_idx
from scio.datasets.natural import _random_crops, _skimage_images
from scio.models.fmnist import FMNIST_NEAR_CLASS_IDS

__all__ = [
    "SCENE_NAMES",
    "VAL_OOD_TITLE",
    "Validation",
    "fmnist_test_indices",
    "validation_data",
    "validation_ood",
]

SCENE_NAMES: tuple[str, ...] = ("camera", "coins", "moon", "page", "text", "clock", "cell")
VAL_OOD_TITLE = "LFW subset + grayscale scenes (validation OoD)"
_N_FACES = 200


@dataclass(frozen=True)
class Validation:
    """ID validation inputs (and their test-split indices) and the validation OoD set."""

    ind: Tensor
    ind_indices: Tensor
    ood: Tensor
    description: str


def _protocol_classes(protocol: str) -> list[int] | None:
    if protocol == "far":
        return None
    if protocol == "near":
        return list(FMNIST_NEAR_CLASS_IDS)
    msg = f"`protocol` must be 'far' or 'near' (got {protocol!r})"
    raise ValueError(msg)


def fmnist_test_indices(
    protocol: str, n_test: int, n_val: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(test, validation)`` indices into the Fashion-MNIST test file for ``protocol``.

    The same rule as :func:`scio.datasets.fashion_mnist` (the pool of the protocol's
    classes in file order, then a seeded permutation): the test set is its first
    ``n_test`` entries, the validation slice the next ``n_val``.
    """
    classes = _protocol_classes(protocol)
    folder = datasets.fashion_mnist_dir()
    labels = torch.from_numpy(_read_idx(folder / _FILES["test"][1]).astype(np.int64))
    pool = torch.arange(len(labels))
    if classes is not None:
        pool = pool[torch.isin(labels, torch.tensor(classes))]
    if n_test < 1 or n_val < 1 or n_test + n_val > len(pool):
        msg = (
            f"`n_test` + `n_val` must be at most the {len(pool)} test images of the {protocol} "
            f"protocol, both positive (got n_test={n_test}, n_val={n_val})"
        )
        raise ValueError(msg)
    order = pool[select_indices(len(pool), n_test + n_val, seed)]
    return order[:n_test], order[n_test:]


def validation_ood(n: int, seed: int = 0) -> ImageDataset:
    """The validation OoD set: LFW-subset images (at most 200, or half of ``n``) then
    random rescaled patches of :data:`SCENE_NAMES`, ``(n, 1, 28, 28)`` in ``[0, 1]``.

    Labels: 0 for LFW images, ``1 + i`` for a patch of scene ``i``.
    """
    sk_data = import_optional("skimage.data", "pip install scikit-image")
    n_faces = min(_N_FACES, n // 2)
    faces = torch.from_numpy(np.asarray(sk_data.lfw_subset(), dtype=np.float32))
    faces = faces[select_indices(len(faces), n_faces, seed)].unsqueeze(1)
    faces = F.interpolate(faces, size=(28, 28), mode="bilinear", antialias=True)
    scenes, scene_labels = _random_crops(
        _skimage_images(SCENE_NAMES), SCENE_NAMES, n - n_faces, seed, 28, rescale=True
    )
    data = torch.cat((faces.clamp_(0.0, 1.0), scenes))
    labels = torch.cat((torch.zeros(n_faces, dtype=torch.int64), 1 + scene_labels))
    return ImageDataset(data, labels, ("lfw", *SCENE_NAMES), "validation-ood")


def validation_data(protocol: str, n_test: int, n_val: int, seed: int = 0) -> Validation:
    """ID validation slice and validation OoD set of ``protocol`` (``n_val`` of each)."""
    _, val_indices = fmnist_test_indices(protocol, n_test, n_val, seed)
    classes = _protocol_classes(protocol)
    # a larger draw with the same seed extends the test draw (see `select_indices`)
    ind = datasets.fashion_mnist("test", n=n_test + n_val, seed=seed, classes=classes)
    ood = validation_ood(n_val, seed=seed)
    description = (
        f"ID validation: {n_val} Fashion-MNIST test images outside the {n_test} test images; "
        f"validation OoD: {n_val} images, {VAL_OOD_TITLE.split(' (')[0]}"
    )
    return Validation(ind.data[n_test:], val_indices, ood.data, description)
