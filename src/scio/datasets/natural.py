"""Natural-image patches and noise (far-OoD inputs), built from bundled scikit-image data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from scio.datasets._base import ImageDataset, import_optional

__all__ = ["PHOTO_NAMES", "TEXTURE_NAMES", "photos", "textures", "uniform_noise"]

TEXTURE_NAMES: tuple[str, ...] = ("grass", "gravel", "brick")
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
_SKIMAGE = "pip install scikit-image"
_LUMA = torch.tensor([0.2125, 0.7154, 0.0721])  # same weights as skimage.color.rgb2gray


def _skimage_images(names: Sequence[str]) -> list[Tensor]:
    """Bundled scikit-image images as float32 ``(C, H, W)`` tensors in [0, 1]."""
    sk_data = import_optional("skimage.data", _SKIMAGE)
    out = []
    for name in names:
        arr = np.asarray(getattr(sk_data, name)())
        img = torch.from_numpy(arr.astype(np.float32) / 255.0)
        out.append(img.unsqueeze(0) if img.ndim == 2 else img.permute(2, 0, 1).contiguous())
    return out


def _random_crops(
    images: list[Tensor], names: tuple[str, ...], n: int, seed: int, size: int, rescale: bool
) -> tuple[Tensor, Tensor]:
    """``n`` crops: image, side (``size`` or, if ``rescale``, up to the image's short side)
    and position drawn from ``torch.Generator().manual_seed(seed)``; resized to ``size``."""
    if n < 0 or size < 1:
        msg = f"need n >= 0 and size >= 1, got n={n}, size={size}"
        raise ValueError(msg)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(images), (n,), generator=gen)
    crops = []
    for k in labels.tolist():
        img = images[k]
        h, w = img.shape[1:]
        if min(h, w) < size:
            msg = f"image {names[k]!r} ({h}×{w}) is smaller than size={size}"
            raise ValueError(msg)
        side = size
        if rescale:
            side = int(torch.randint(size, min(h, w) + 1, (1,), generator=gen))
        top = int(torch.randint(h - side + 1, (1,), generator=gen))
        left = int(torch.randint(w - side + 1, (1,), generator=gen))
        crop = img[None, :, top : top + side, left : left + side]
        if side != size:
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
        crops.append(crop)
    channels = images[0].shape[0] if images else 1
    data = torch.cat(crops) if crops else torch.empty(0, channels, size, size)
    return data.clamp_(0.0, 1.0), labels


def textures(n: int, seed: int = 0, size: int = 28) -> ImageDataset:
    """Grayscale ``size``×``size`` crops at native scale of the grass/gravel/brick textures.

    Label = texture index into :data:`TEXTURE_NAMES`; shape ``(n, 1, size, size)``.
    """
    data, labels = _random_crops(
        _skimage_images(TEXTURE_NAMES), TEXTURE_NAMES, n, seed, size, rescale=False
    )
    return ImageDataset(data, labels, TEXTURE_NAMES, "skimage-textures")


def photos(n: int, seed: int = 0, size: int = 28, grayscale: bool = True) -> ImageDataset:
    """Random square patches of the bundled RGB photos, downsampled (antialiased) to ``size``.

    Each patch's side is drawn uniformly between ``size`` and the photo's short side, so
    patches range from fine texture to whole scenes. Label = photo index into
    :data:`PHOTO_NAMES`; shape ``(n, 1 or 3, size, size)``.
    """
    images = _skimage_images(PHOTO_NAMES)
    if grayscale:
        images = [torch.einsum("chw,c->hw", img, _LUMA).unsqueeze(0) for img in images]
    data, labels = _random_crops(images, PHOTO_NAMES, n, seed, size, rescale=True)
    return ImageDataset(data, labels, PHOTO_NAMES, "skimage-photos")


def uniform_noise(n: int, shape: Sequence[int] = (1, 28, 28), seed: int = 0) -> ImageDataset:
    """i.i.d. uniform [0, 1) pixels, ``(n, *shape)``; all labels 0 (class ``"uniform noise"``)."""
    if len(shape) != 3:
        msg = f"shape must be (C, H, W), got {tuple(shape)}"
        raise ValueError(msg)
    gen = torch.Generator().manual_seed(seed)
    data = torch.rand((n, *shape), generator=gen)
    return ImageDataset(data, torch.zeros(n, dtype=torch.int64), ("uniform noise",), "uniform")
