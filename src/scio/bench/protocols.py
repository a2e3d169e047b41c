"""The two benchmark protocols: data sets and model for far- and near-OoD."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from scio import datasets
from scio.models import fmnist, fmnist_near
from scio.models.fmnist import FMNIST_NEAR_CLASS_IDS, FMNIST_NEAR_OOD_CLASSES, fmnist_near_targets

__all__ = ["PROTOCOLS", "Protocol", "far_ood", "near_ood"]


@dataclass
class Protocol:
    """Everything a benchmark run needs: model, calibration, InD test and OoD sets."""

    name: str
    description: str
    net: nn.Module
    calib_data: Tensor
    calib_labels: Tensor
    ind: Tensor
    oods: tuple[Tensor, ...]
    oods_title: tuple[str, ...]


def far_ood(n_calib: int = 5000, n_test: int = 2000, seed: int = 0) -> Protocol:
    """Fashion-MNIST vs. other grayscale 28×28 data (far-OoD)."""
    calib = datasets.fashion_mnist("calibration", n=n_calib, seed=seed)
    ind = datasets.fashion_mnist("test", n=n_test, seed=seed)
    sets = (
        ("MNIST", datasets.mnist(n=min(n_test, 5000), seed=seed)),
        ("Animal-MNIST", datasets.animal_mnist(n=min(n_test, 10000), seed=seed)),
        ("Digits (8×8↑28)", datasets.digits(n=min(n_test, 1797), seed=seed)),
        ("Textures", datasets.textures(n_test, seed=seed)),
        ("Photos", datasets.photos(n_test, seed=seed)),
        ("Uniform noise", datasets.uniform_noise(n_test, seed=seed)),
    )
    return Protocol(
        name="far",
        description="InD: Fashion-MNIST test (10 classes, scio.models.fmnist); "
        "OoD: MNIST, Animal-MNIST, digits, textures, photos, uniform noise",
        net=fmnist(),
        calib_data=calib.data,
        calib_labels=calib.labels,
        ind=ind.data,
        oods=tuple(data.data for _, data in sets),
        oods_title=tuple(title for title, _ in sets),
    )


def near_ood(n_calib: int = 5000, n_test: int = 2000, seed: int = 0) -> Protocol:
    """Fashion-MNIST without Shirt / Ankle boot vs. those two held-out classes (near-OoD)."""
    kept = list(FMNIST_NEAR_CLASS_IDS)
    calib = datasets.fashion_mnist("calibration", n=None, seed=seed, classes=kept)
    calib_data, calib_labels = calib.data[:n_calib], fmnist_near_targets(calib.labels[:n_calib])
    ind = datasets.fashion_mnist("test", n=n_test, seed=seed, classes=kept)
    held_out = datasets.fashion_mnist(
        "test", n=min(n_test, 2000), seed=seed, classes=list(FMNIST_NEAR_OOD_CLASSES)
    )
    return Protocol(
        name="near",
        description="InD: Fashion-MNIST test, 8 classes (scio.models.fmnist_near); "
        "OoD: the held-out classes Shirt and Ankle boot",
        net=fmnist_near(),
        calib_data=calib_data,
        calib_labels=calib_labels,
        ind=ind.data,
        oods=(held_out.data,),
        oods_title=("Shirt + Ankle boot (held out)",),
    )


PROTOCOLS: dict[str, Callable[..., Protocol]] = {"far": far_ood, "near": near_ood}
