"""The "Tiniest" CIFAR-10 classifier used by the tutorials (97,530 parameters).

Architecture from the cifar10-tiniest project; trained weights published under the MIT
license by ThalesGroup (scio, ``hub`` branch). See ``weights/ATTRIBUTION.md``.
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CIFAR10_CLASSES", "Block", "LayerNorm2d", "Tiniest", "load_weights", "tiniest"]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def load_weights(filename: str) -> dict[str, Tensor]:
    """Load the state dict ``scio/models/weights/<filename>`` on CPU (``weights_only=True``)."""
    ref = resources.files("scio.models").joinpath("weights", filename)
    if not ref.is_file():
        msg = f"Shipped weight file {filename!r} not found in package 'scio.models.weights'"
        raise FileNotFoundError(msg)
    with ref.open("rb") as f:
        state: dict[str, Tensor] = torch.load(f, map_location="cpu", weights_only=True)
    return state


class LayerNorm2d(nn.Module):
    """``nn.LayerNorm`` over the channel axis of an ``(N, C, H, W)`` tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    """Multi-scale depthwise mixing + gated 1×1 MLP, with a learnable residual scale."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 4:
            msg = f"Block dim must be a multiple of 4, got {dim}"
            raise ValueError(msg)
        c = dim // 4
        # Declaration order matters: it fixes the ``state_dict`` key order.
        self.rs = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.dwconv1 = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.dwconv2 = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.dwconv3 = nn.Conv2d(c, c, 7, padding=9, dilation=3, groups=c)
        self.ln = LayerNorm2d(dim)
        self.fc1 = nn.Conv2d(dim, 2 * dim, 1)
        self.fc2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x0, x1, x2, x3 = torch.chunk(x, 4, dim=1)
        x1 = self.dwconv1(x1)
        x2 = self.dwconv2(x2)
        x3 = self.dwconv3(F.avg_pool2d(x3, 3, stride=1, padding=1))
        y = self.ln(torch.cat([x0, x1, x2, x3], dim=1))
        a, b = torch.chunk(self.fc1(y), 2, dim=1)
        y = self.fc2(torch.tanh(torch.exp(a)) * a * b)
        return y + x * self.rs


class Tiniest(nn.Module):
    """CIFAR-10 classifier: inputs RGB in ``[0, 1]``, shape ``(N, 3, 32, 32)``, no normalisation."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 48, 3, padding=1)
        self.ln1 = LayerNorm2d(48)
        self.l1 = Block(48)
        self.l2 = Block(48)
        self.l3 = Block(48)
        self.dsconv = nn.Conv2d(48, 80, 4, stride=2, padding=1, groups=16)
        self.ln2 = LayerNorm2d(80)
        self.l4 = Block(80)
        self.l5 = Block(80)
        self.l6 = Block(80)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(80, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln1(self.conv1(x))
        x = self.l3(self.l2(self.l1(x)))
        x = self.ln2(self.dsconv(x))
        x = self.l6(self.l5(self.l4(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiniest(pretrained: bool = True, device: str | torch.device = "cpu") -> Tiniest:
    """Build :class:`Tiniest`, optionally with the shipped CIFAR-10 weights, in eval mode."""
    net = Tiniest()
    if pretrained:
        net.load_state_dict(load_weights("tiniest.pt"))
    return net.to(device).eval()
