"""Compact Fashion-MNIST CNNs shipped with scio (trained by ``scripts/train_fmnist.py``).

* :func:`fmnist` — all 10 classes (in-distribution model).
* :func:`fmnist_near` — trained on 8 classes; ``Shirt`` and ``Ankle boot`` are held out as
  near-OoD (see ``docs/models.md``). Output ``k`` is Fashion-MNIST class
  ``FMNIST_NEAR_CLASS_IDS[k]``.

Inputs: grayscale images in ``[0, 1]``, shape ``(N, 1, 28, 28)``, no normalisation. Both were
trained on the ``"fit"`` part of the training split only; the last 5,000 training images
(:func:`scio.datasets.fashion_mnist_calibration_split`) are left for calibration.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from scio.datasets.fashion import FMNIST_CLASSES
from scio.models.tiniest import load_weights

__all__ = [
    "FMNIST_CLASSES",
    "FMNIST_NEAR_CLASSES",
    "FMNIST_NEAR_CLASS_IDS",
    "FMNIST_NEAR_OOD_CLASSES",
    "ConvBlock",
    "FashionCNN",
    "fmnist",
    "fmnist_near",
    "fmnist_near_targets",
]

FMNIST_NEAR_OOD_CLASSES: tuple[str, ...] = ("Shirt", "Ankle boot")
"""Fashion-MNIST classes held out from :func:`fmnist_near` (its near-OoD)."""
FMNIST_NEAR_CLASS_IDS: tuple[int, ...] = tuple(
    i for i, c in enumerate(FMNIST_CLASSES) if c not in FMNIST_NEAR_OOD_CLASSES
)
"""Output ``k`` of :func:`fmnist_near` ↔ Fashion-MNIST label ``FMNIST_NEAR_CLASS_IDS[k]``."""
FMNIST_NEAR_CLASSES: tuple[str, ...] = tuple(FMNIST_CLASSES[i] for i in FMNIST_NEAR_CLASS_IDS)


def fmnist_near_targets(labels: Tensor) -> Tensor:
    """Map Fashion-MNIST labels to :func:`fmnist_near` output indices (``-1`` for held-out)."""
    mapping = torch.full((len(FMNIST_CLASSES),), -1, dtype=torch.int64, device=labels.device)
    mapping[list(FMNIST_NEAR_CLASS_IDS)] = torch.arange(
        len(FMNIST_NEAR_CLASS_IDS), device=labels.device
    )
    return mapping[labels]


class ConvBlock(nn.Sequential):
    """``conv`` 3×3 (no bias) → ``bn`` BatchNorm2d → ``relu``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(out_channels),
                relu=nn.ReLU(),
            )
        )


class FashionCNN(nn.Module):
    """28×28 grayscale CNN: 4 conv blocks, 2 max-pools, global average pool, linear head.

    ``avgpool`` outputs the 128-d penultimate features (``(N, 128, 1, 1)``); ``fc`` the logits.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.block1 = ConvBlock(1, 32)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = ConvBlock(32, 64)
        self.block3 = ConvBlock(64, 64)
        self.pool2 = nn.MaxPool2d(2)
        self.block4 = ConvBlock(64, 128)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block3(self.block2(x)))
        x = self.avgpool(self.block4(x))
        return self.fc(torch.flatten(x, 1))


def _build(
    num_classes: int, weights: str, pretrained: bool, device: str | torch.device
) -> FashionCNN:
    net = FashionCNN(num_classes)
    if pretrained:
        net.load_state_dict(load_weights(weights))
    return net.to(device).eval()


def fmnist(pretrained: bool = True, device: str | torch.device = "cpu") -> FashionCNN:
    """The 10-class Fashion-MNIST model (classes :data:`FMNIST_CLASSES`), in eval mode."""
    return _build(len(FMNIST_CLASSES), "fmnist.pt", pretrained, device)


def fmnist_near(pretrained: bool = True, device: str | torch.device = "cpu") -> FashionCNN:
    """The 8-class model (classes :data:`FMNIST_NEAR_CLASSES`; Shirt, Ankle boot held out)."""
    return _build(len(FMNIST_NEAR_CLASS_IDS), "fmnist_near.pt", pretrained, device)
