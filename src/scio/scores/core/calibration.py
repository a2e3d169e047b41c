"""Calibration plumbing shared by every score: batches, mergeable state, label checks.

A score is calibrated from a stream of :class:`CalibBatch` objects. Each batch runs (at
most) one forward pass of the recorder, lazily, and exposes the logits and the recorded
activations of the score's layers; the score keeps only what it needs in a
:class:`CalibState` (features to concatenate, running sums to add), never raw inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scio.utils.state import CalibState

if TYPE_CHECKING:
    from scio.recorder import Recorder

__all__ = ["CalibBatch", "CalibState", "as_batches", "validate_labels"]


class CalibBatch:
    """One calibration batch: inputs, labels, and (lazily) logits and activations.

    Args:
        inputs: the batch of inputs.
        labels: the matching labels (anything; validated only by scores that use them).
        rnet: the recorder whose forward produces logits and activations.
        out: precomputed logits (then ``activations`` must be given too).
        activations: precomputed recorded activations, in firing order.
        tapped: precomputed inputs of the recorder's tapped modules (see
            :meth:`tapped`).
    """

    __slots__ = ("_activations", "_out", "_tapped", "inputs", "labels", "rnet")

    def __init__(
        self,
        inputs: Tensor,
        labels: Any,
        rnet: Recorder | None = None,
        *,
        out: Tensor | None = None,
        activations: tuple[Tensor, ...] | None = None,
        tapped: dict[Any, Tensor] | None = None,
    ) -> None:
        self.inputs = inputs
        self.labels = labels
        self.rnet = rnet
        self._out = out
        self._activations = activations
        self._tapped = tapped

    def __len__(self) -> int:
        return len(self.inputs)

    def _forward(self) -> None:
        if self.rnet is None:
            msg = "This calibration batch has no recorder to compute its logits"
            raise RuntimeError(msg)
        with torch.no_grad():
            self._out = self.rnet(self.inputs)
        self._activations = tuple(self.rnet.activations.values())
        self._tapped = dict(self.rnet._tapped_inputs)

    @property
    def out(self) -> Tensor:
        """Network output (logits) for the batch, computed without gradient."""
        if self._out is None:
            self._forward()
        assert self._out is not None
        return self._out

    @property
    def activations(self) -> tuple[Tensor, ...]:
        """Raw recorded activations of the batch, in firing order."""
        if self._activations is None:
            self._forward()
        assert self._activations is not None
        return self._activations

    def tapped(self, module: Any) -> Tensor:
        """Input of a module tapped by the recorder (e.g. a classifier head's features)."""
        if self._tapped is None or module not in self._tapped:
            self._forward()
        assert self._tapped is not None
        try:
            return self._tapped[module]
        except KeyError:
            msg = f"The recorder does not tap the inputs of {type(module).__name__}"
            raise RuntimeError(msg) from None


def validate_labels(
    labels: Any, n_samples: int, n_classes: int, *, name: str = "calib_labels"
) -> Tensor:
    """Return ``labels`` as a 1-D int64 tensor, or raise ``ValueError``/``TypeError``.

    Labels must be integers in ``[0, n_classes)``, one per sample. Absent classes are fine.
    """
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except Exception as exc:
            msg = f"`{name}` must be a 1-D integer tensor (got {type(labels).__name__})"
            raise TypeError(msg) from exc
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        msg = f"`{name}` must have an integer dtype (got {labels.dtype})"
        raise ValueError(msg)
    if labels.ndim != 1 or len(labels) != n_samples:
        msg = (
            f"`{name}` must have shape ({n_samples},), one label per sample "
            f"(got {tuple(labels.shape)})"
        )
        raise ValueError(msg)
    if n_samples and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        bad = labels[(labels < 0) | (labels >= n_classes)]
        msg = (
            f"`{name}` values must lie in [0, {n_classes}) for a network with {n_classes} "
            f"outputs (got {bad[:5].tolist()})"
        )
        raise ValueError(msg)
    return labels.to(torch.int64)


def _dataset_len(data: object) -> int | None:
    dataset = getattr(data, "dataset", None)
    if isinstance(dataset, Sized):
        return len(dataset)
    return None


def as_batches(
    calib_data: Any, calib_labels: Any
) -> tuple[Iterator[tuple[Tensor, Any]], int | None]:
    """Normalise ``fit`` arguments to an iterator of ``(inputs, labels)`` batches.

    ``calib_data`` is either a tensor (one batch, with ``calib_labels``) or an iterable of
    ``(inputs, labels)`` pairs / bare input tensors such as a ``DataLoader`` (then
    ``calib_labels`` must be omitted). Returns the iterator and the number of samples when
    it is known in advance.
    """
    if isinstance(calib_data, Tensor):
        return iter([(calib_data, calib_labels)]), len(calib_data)
    if not isinstance(calib_data, Iterable):
        msg = (
            "`calib_data` must be a tensor or an iterable of (inputs, labels) batches "
            f"(got {type(calib_data).__name__})"
        )
        raise TypeError(msg)
    if calib_labels is not None:
        if hasattr(calib_data, "__array__") and hasattr(calib_data, "shape"):
            msg = (
                "`calib_data` must be a torch.Tensor when `calib_labels` are given (got "
                f"{type(calib_data).__name__}): convert it with `torch.as_tensor(calib_data)`"
            )
            raise TypeError(msg)
        msg = (
            "`calib_labels` must be None when `calib_data` is an iterable of batches "
            "(labels come with each batch)"
        )
        raise ValueError(msg)

    def batches() -> Iterator[tuple[Tensor, Any]]:
        for i, item in enumerate(calib_data):
            if isinstance(item, Tensor):
                yield item, None
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                yield item[0], item[1]
            else:
                msg = (
                    f"Calibration batch {i} must be a tensor or an (inputs, labels) pair "
                    f"(got {type(item).__name__})"
                )
                raise TypeError(msg)

    return batches(), _dataset_len(calib_data)


def concat_labels(labels: list[Any]) -> Any:
    """Concatenate per-batch labels (tensors, sequences or ``None``)."""
    if all(label is None for label in labels):
        return None
    if all(isinstance(label, Tensor) for label in labels):
        return labels[0] if len(labels) == 1 else torch.cat(labels)
    return list(chain.from_iterable(labels))
