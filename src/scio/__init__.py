"""scio: confidence scores for any trained PyTorch model (post-hoc OoD detection).

Submodules are imported lazily, so ``import scio; scio.eval.summary(...)`` works without an
explicit ``import scio.eval``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("scio")
except PackageNotFoundError:  # pragma: no cover - source checkout without install
    __version__ = "unknown"

_SUBMODULES = ("datasets", "eval", "models", "recorder", "scores", "utils")

__all__ = [
    "__version__",
    "datasets",
    "eval",
    "load_score",
    "models",
    "recorder",
    "scores",
    "utils",
]

if TYPE_CHECKING:
    from scio import datasets, eval, models, recorder, scores, utils
    from scio.serialization import load_score as load_score


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"scio.{name}")
    if name == "load_score":
        return importlib.import_module("scio.serialization").load_score
    msg = f"module 'scio' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
