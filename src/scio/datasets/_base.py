"""Shared pieces of :mod:`scio.datasets`: the dataset container, errors and helpers."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DatasetDependencyError",
    "DatasetNotFoundError",
    "ImageDataset",
    "import_optional",
    "package_file",
    "select_indices",
    "to_images",
]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names the package providing them."""


class DatasetDependencyError(ModuleNotFoundError):
    """A Python package needed to build a dataset is not installed."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images ``data`` (float32 in ``[0, 1]``, ``(n, C, H, W)``) with int64 ``labels``.

    ``labels[i]`` indexes ``classes``; ``name`` identifies the source (for reports).
    """

    data: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.data.ndim != 4 or self.labels.shape != (len(self.data),):
            msg = f"bad shapes: data {tuple(self.data.shape)}, labels {tuple(self.labels.shape)}"
            raise ValueError(msg)

    def __len__(self) -> int:
        return len(self.data)

    def subset(self, indices: Tensor | slice) -> ImageDataset:
        """The samples at ``indices`` (same classes and name)."""
        return ImageDataset(self.data[indices], self.labels[indices], self.classes, self.name)


def select_indices(total: int, n: int | None, seed: int) -> Tensor:
    """All of ``range(total)`` if ``n`` is None, else ``n`` of them drawn without replacement.

    The draw is ``torch.randperm(total, generator=manual_seed(seed))[:n]``: deterministic,
    and a smaller ``n`` with the same seed gives a prefix of a larger one.
    """
    if n is None:
        return torch.arange(total)
    if not 0 <= n <= total:
        msg = f"n must be in [0, {total}], got {n}"
        raise ValueError(msg)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=gen)[:n]


def to_images(arr: np.ndarray, indices: Tensor) -> Tensor:
    """``uint8`` array ``(N, H, W)`` rows at ``indices`` → float32 ``(n, 1, H, W)`` in [0, 1]."""
    sel = torch.from_numpy(np.ascontiguousarray(arr[indices.numpy()]))
    return sel.unsqueeze(1).to(torch.float32).div_(255.0)


def package_file(package: str, relpath: str, install: str) -> Path:
    """Path of ``relpath`` inside the installed ``package``, without importing the package.

    Raises :class:`DatasetNotFoundError` (naming ``install``) if the package or file is missing.
    """
    spec = find_spec(package)  # top-level name: locates the package, executes nothing
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / relpath
        if path.is_file():
            return path
    where = f"package {package!r} is not installed" if not locations else f"{relpath} not found"
    msg = f"Dataset file unavailable ({where}). Install it with: {install}"
    raise DatasetNotFoundError(msg)


def import_optional(module: str, install: str) -> ModuleType:
    """Import ``module`` or raise :class:`DatasetDependencyError` naming ``install``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        msg = f"{module!r} is needed for this dataset. Install it with: {install}"
        raise DatasetDependencyError(msg, name=module) from err
