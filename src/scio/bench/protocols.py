"""The two benchmark protocols: data sets and model for far- and near-OoD."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from scio import datasets
from scio import scores as S
from scio.models import fmnist, fmnist_near, vit_fmnist, vit_fmnist_near
from scio.models.fmnist import FMNIST_NEAR_CLASS_IDS, FMNIST_NEAR_OOD_CLASSES, fmnist_near_targets

__all__ = ["MODELS", "PROTOCOLS", "BenchModel", "Protocol", "far_ood", "near_ood"]


@dataclass(frozen=True)
class BenchModel:
    """A model family: its far (10-class) and near (8-class) loaders, how the benchmark's
    layer names (the CNN's: ``avgpool``, ``fc``, ``pool2``, ``block3``, ``block4``) map to
    its modules, and score factories replacing the defaults where the model needs it."""

    far: Callable[[], nn.Module]
    near: Callable[[], nn.Module]
    layers: dict[str, str] = field(default_factory=dict)
    factories: dict[str, Callable[[], Any]] = field(default_factory=dict)


MODELS: dict[str, BenchModel] = {
    "cnn": BenchModel(fmnist, fmnist_near),
    "vit": BenchModel(
        vit_fmnist,
        vit_fmnist_near,
        # penultimate = the normed CLS token (head input), mid-level = a middle block's
        # tokens, RankFeat's "last two blocks" = the last two transformer blocks
        layers={
            "avgpool": "norm",
            "fc": "head",
            "pool2": "blocks.3",
            "block3": "blocks.4",
            "block4": "blocks.5",
        },
        factories={"Residual": lambda: S.Residual(dim=32)},  # needs dim < d = 64
    ),
}
"""``scio bench --model``: the model families the protocols can run on."""


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
    layers: dict[str, str] = field(default_factory=dict)
    factories: dict[str, Callable[[], Any]] = field(default_factory=dict)


def far_ood(n_calib: int = 5000, n_test: int = 2000, seed: int = 0, model: str = "cnn") -> Protocol:
    """Fashion-MNIST vs. other grayscale 28×28 data (far-OoD), on ``MODELS[model]``."""
    family = _family(model)
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
        description=f"InD: Fashion-MNIST test (10 classes, scio.models.{family.far.__name__}); "
        "OoD: MNIST, Animal-MNIST, digits, textures, photos, uniform noise",
        net=family.far(),
        calib_data=calib.data,
        calib_labels=calib.labels,
        ind=ind.data,
        oods=tuple(data.data for _, data in sets),
        oods_title=tuple(title for title, _ in sets),
        layers=family.layers,
        factories=family.factories,
    )


def near_ood(
    n_calib: int = 5000, n_test: int = 2000, seed: int = 0, model: str = "cnn"
) -> Protocol:
    """Fashion-MNIST without Shirt / Ankle boot vs. those two held-out classes (near-OoD)."""
    family = _family(model)
    kept = list(FMNIST_NEAR_CLASS_IDS)
    calib = datasets.fashion_mnist("calibration", n=None, seed=seed, classes=kept)
    calib_data, calib_labels = calib.data[:n_calib], fmnist_near_targets(calib.labels[:n_calib])
    ind = datasets.fashion_mnist("test", n=n_test, seed=seed, classes=kept)
    held_out = datasets.fashion_mnist(
        "test", n=min(n_test, 2000), seed=seed, classes=list(FMNIST_NEAR_OOD_CLASSES)
    )
    return Protocol(
        name="near",
        description="InD: Fashion-MNIST test, 8 classes "
        f"(scio.models.{family.near.__name__}); OoD: the held-out classes Shirt and Ankle boot",
        net=family.near(),
        calib_data=calib_data,
        calib_labels=calib_labels,
        ind=ind.data,
        oods=(held_out.data,),
        oods_title=("Shirt + Ankle boot (held out)",),
        layers=family.layers,
        factories=family.factories,
    )


def _family(model: str) -> BenchModel:
    if model not in MODELS:
        msg = f"`model` must be one of {sorted(MODELS)} (got {model!r})"
        raise ValueError(msg)
    return MODELS[model]


PROTOCOLS: dict[str, Callable[..., Protocol]] = {"far": far_ood, "near": near_ood}
