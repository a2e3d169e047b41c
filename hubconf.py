"""``torch.hub`` entry points: ``torch.hub.load(<checkout>, "tiniest", source="local")``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

dependencies = ["torch"]

try:
    import scio.models as _models
except ModuleNotFoundError:  # plain source checkout, scio not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    import scio.models as _models


def tiniest(*, device: str | torch.device = "cpu", pretrained: bool = True) -> nn.Module:
    """CIFAR-10 tutorial model "Tiniest" (97,530 parameters), in eval mode."""
    return _models.tiniest(pretrained=pretrained, device=device)


def fmnist(*, device: str | torch.device = "cpu", pretrained: bool = True) -> nn.Module:
    """Compact Fashion-MNIST CNN (10 classes), in eval mode."""
    return _models.fmnist(pretrained=pretrained, device=device)


def fmnist_near(*, device: str | torch.device = "cpu", pretrained: bool = True) -> nn.Module:
    """Fashion-MNIST CNN trained without the near-OoD held-out classes, in eval mode."""
    return _models.fmnist_near(pretrained=pretrained, device=device)


def vit_fmnist(*, device: str | torch.device = "cpu", pretrained: bool = True) -> nn.Module:
    """Small Fashion-MNIST Vision Transformer (10 classes), in eval mode."""
    return _models.vit_fmnist(pretrained=pretrained, device=device)


def vit_fmnist_near(*, device: str | torch.device = "cpu", pretrained: bool = True) -> nn.Module:
    """Fashion-MNIST ViT trained without the near-OoD held-out classes, in eval mode."""
    return _models.vit_fmnist_near(pretrained=pretrained, device=device)
