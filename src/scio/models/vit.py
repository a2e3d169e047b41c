"""A small Vision Transformer for Fashion-MNIST (trained by ``scripts/train_vit.py``).

Architecture after Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for
Image Recognition at Scale" (ICLR 2021): non-overlapping patches embedded linearly, a
learnable class (CLS) token and position embeddings, pre-norm transformer blocks, and a
linear head on the final-normed CLS token. Plain torch (no ``transformers``), attention
written with matmuls and softmax, so the model is ``torch.fx``-traceable and every input
gradient is an ordinary autograd graph.

* :func:`vit_fmnist` — all 10 Fashion-MNIST classes.
* :func:`vit_fmnist_near` — trained on 8 classes; ``Shirt`` and ``Ankle boot`` are held out
  as near-OoD (output ``k`` is Fashion-MNIST class ``FMNIST_NEAR_CLASS_IDS[k]``).

Named modules for recording: ``patch`` (tokens ``(N, 50, 64)``: CLS + 7×7 patches),
``blocks.0`` … ``blocks.5`` (same shape), ``norm`` (the normed CLS token ``(N, 64)``, the
head's input: penultimate features), ``head`` (logits). Inputs: grayscale images in
``[0, 1]``, shape ``(N, 1, 28, 28)``, no normalisation; trained on the ``"fit"`` part of the
training split only (see ``docs/models.md``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scio.datasets.fashion import FMNIST_CLASSES
from scio.models.fmnist import FMNIST_NEAR_CLASS_IDS
from scio.models.tiniest import load_weights

__all__ = [
    "Attention",
    "PatchEmbed",
    "TransformerBlock",
    "ViT",
    "vit_fmnist",
    "vit_fmnist_near",
]


class PatchEmbed(nn.Module):
    """``proj`` (patch × patch conv, stride patch) → tokens, CLS token prepended, positions added.

    ``(N, C, H, W)`` → ``(N, 1 + (H / patch) · (W / patch), dim)``.
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            msg = f"`patch_size` must divide `image_size` (got {patch_size} and {image_size})"
            raise ValueError(msg)
        n_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (N, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


class Attention(nn.Module):
    """Multi-head self-attention: ``softmax(q kᵀ / √d_head) v`` per head, then ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            msg = f"`heads` must divide `dim` (got heads={heads}, dim={dim})"
            raise ValueError(msg)
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t = x.shape[0], x.shape[1]  # no tuple unpacking: torch.fx traces this
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (N, heads, T, head_dim)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, t, self.heads * self.head_dim)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer classifier: ``patch`` → ``blocks`` → ``norm`` (CLS) → ``head``.

    The final LayerNorm is applied to the CLS token only (equal to norming every token and
    then taking the first: LayerNorm acts token by token), so ``norm`` outputs the head's
    ``(N, dim)`` input.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        image_size: int = 28,
        patch_size: int = 4,
        in_channels: int = 1,
        dim: int = 64,
        depth: int = 6,
        heads: int = 4,
        mlp_dim: int = 128,
    ) -> None:
        super().__init__()
        self.patch = PatchEmbed(image_size, patch_size, in_channels, dim)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.patch(x))
        return self.head(self.norm(x[:, 0]))


def _build(num_classes: int, weights: str, pretrained: bool, device: str | torch.device) -> ViT:
    net = ViT(num_classes)
    if pretrained:
        net.load_state_dict(load_weights(weights))
    return net.to(device).eval()


def vit_fmnist(pretrained: bool = True, device: str | torch.device = "cpu") -> ViT:
    """The 10-class Fashion-MNIST ViT (classes :data:`FMNIST_CLASSES`), in eval mode."""
    return _build(len(FMNIST_CLASSES), "vit_fmnist.pt", pretrained, device)


def vit_fmnist_near(pretrained: bool = True, device: str | torch.device = "cpu") -> ViT:
    """The 8-class ViT (classes :data:`FMNIST_NEAR_CLASSES`; Shirt, Ankle boot held out)."""
    return _build(len(FMNIST_NEAR_CLASS_IDS), "vit_fmnist_near.pt", pretrained, device)
