"""Trained models shipped with scio (weights are package data, loaded offline).

* :func:`tiniest` — the CIFAR-10 tutorial model (:class:`Tiniest`).
* :func:`fmnist`, :func:`fmnist_near` — compact Fashion-MNIST CNNs (:class:`FashionCNN`),
  the second trained without the near-OoD classes ``Shirt`` and ``Ankle boot``.
"""

from scio.models.fmnist import (
    FMNIST_CLASSES,
    FMNIST_NEAR_CLASS_IDS,
    FMNIST_NEAR_CLASSES,
    FMNIST_NEAR_OOD_CLASSES,
    FashionCNN,
    fmnist,
    fmnist_near,
    fmnist_near_targets,
)
from scio.models.tiniest import CIFAR10_CLASSES, Tiniest, tiniest

__all__ = [
    "CIFAR10_CLASSES",
    "FMNIST_CLASSES",
    "FMNIST_NEAR_CLASSES",
    "FMNIST_NEAR_CLASS_IDS",
    "FMNIST_NEAR_OOD_CLASSES",
    "FashionCNN",
    "Tiniest",
    "fmnist",
    "fmnist_near",
    "fmnist_near_targets",
    "tiniest",
]
