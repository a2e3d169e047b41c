"""Trained models shipped with scio (weights are package data, loaded offline).

* :func:`tiniest` — the CIFAR-10 tutorial model (:class:`Tiniest`).
* :func:`fmnist`, :func:`fmnist_near` — compact Fashion-MNIST CNNs (:class:`FashionCNN`),
  the second trained without the near-OoD classes ``Shirt`` and ``Ankle boot``.
* :func:`vit_fmnist`, :func:`vit_fmnist_near` — small Fashion-MNIST Vision Transformers
  (:class:`ViT`), the same pair of tasks (a second model family for the benchmark).
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
from scio.models.vit import ViT, vit_fmnist, vit_fmnist_near

__all__ = [
    "CIFAR10_CLASSES",
    "FMNIST_CLASSES",
    "FMNIST_NEAR_CLASSES",
    "FMNIST_NEAR_CLASS_IDS",
    "FMNIST_NEAR_OOD_CLASSES",
    "FashionCNN",
    "Tiniest",
    "ViT",
    "fmnist",
    "fmnist_near",
    "fmnist_near_targets",
    "tiniest",
    "vit_fmnist",
    "vit_fmnist_near",
]
