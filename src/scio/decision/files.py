"""Conformal detector files: a safe payload of plain values and tensors (the scores' own
payloads, the holdout state), written and read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from scio.serialization import check_payload, score_from_payload, score_payload

__all__ = ["DetectorFileError", "read_detector", "save_detector"]

_MAGIC = "scio-conformal-detector"
_FORMAT_VERSION = 1


class DetectorFileError(ValueError):
    """A detector file is unreadable, of another format version or of another algorithm."""


def save_detector(detector: Any, path: str | os.PathLike[str]) -> None:
    """Write a fitted :class:`~scio.decision.ConformalDetector`'s parameters, scores and
    holdout state to ``path``."""
    payload = {
        "magic": _MAGIC,
        "format_version": _FORMAT_VERSION,
        "class": type(detector).__name__,
        "params": {
            "combine": detector.combine,
            "class_conditional": detector.class_conditional,
            "randomize": detector.randomize,
            "seed": detector.seed,
        },
        "scores": [score_payload(score) for score in detector.scores],
        "state": {
            "holdout_conformities_": detector.holdout_conformities_.detach().cpu().clone(),
            "holdout_classes_": detector.holdout_classes_.detach().cpu().clone(),
            "n_classes_": detector.n_classes_,
        },
    }
    torch.save(payload, path)


def read_detector(
    class_name: str,
    path: str | os.PathLike[str],
    net: nn.Module | Sequence[nn.Module],
    classes: Iterable[type],
    recorder_kwargs: dict[str, Any],
) -> tuple[dict[str, Any], list[Any], dict[str, Any], list[nn.Module]]:
    """``(params, scores bound to net, holdout state, networks)`` of a detector file.

    Raises:
        DetectorFileError: unsafe, unreadable, other format version or other algorithm.
        ValueError: ``net`` is neither one network nor one per score.
    """
    source = os.fspath(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = (
            f"{source!r} is not a safe scio detector file: it holds objects other than "
            "tensors and plain values, and was not loaded"
        )
        raise DetectorFileError(msg) from exc
    except (RuntimeError, EOFError) as exc:
        msg = f"{source!r} is not a readable scio detector file ({exc})"
        raise DetectorFileError(msg) from exc
    if not isinstance(payload, dict) or payload.get("magic") != _MAGIC:
        msg = f"{source!r} is not a scio detector file"
        raise DetectorFileError(msg)
    if payload.get("format_version") != _FORMAT_VERSION:
        msg = (
            f"{source!r} uses detector format version {payload.get('format_version')!r}; "
            f"this scio reads version {_FORMAT_VERSION}"
        )
        raise DetectorFileError(msg)
    if payload.get("class") != class_name:
        msg = f"{source!r} holds a {payload.get('class')!r} detector, not a {class_name}"
        raise DetectorFileError(msg)
    entries = payload["scores"]
    nets = [net] * len(entries) if isinstance(net, nn.Module) else list(net)
    if len(nets) != len(entries):
        msg = f"`net` must be one network or {len(entries)} networks (got {len(nets)})"
        raise ValueError(msg)
    scores = [
        score_from_payload(
            check_payload(entry, f"{source}[scores][{i}]"),
            n,
            f"{source}[scores][{i}]",
            classes=classes,
            **recorder_kwargs,
        )
        for i, (entry, n) in enumerate(zip(entries, nets))
    ]
    return payload["params"], scores, payload["state"], nets
