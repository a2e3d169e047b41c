"""Calibration plumbing shared by every score: batches, mergeable state, label checks.

A score is calibrated from a stream of :class:`CalibBatch` objects. Each batch runs (at
most) one forward pass of the recorder, lazily, and exposes the logits and the recorded
activations of the score's layers; the score keeps only what it needs in a
:class:`CalibState` (features to concatenate, running sums to add), never raw inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sized
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scio.recorder.io import batch_size, split_labels, take_rows
from scio.scores.core.validation import nonfinite_rows
from scio.utils.state import CalibState

if TYPE_CHECKING:
    from scio.recorder import Recorder

__all__ = [
    "NONFINITE_POLICIES",
    "CalibBatch",
    "CalibState",
    "CalibStream",
    "NoCalibration",
    "StreamingCalibration",
    "as_batches",
    "check_nonfinite_policy",
    "example_batch",
    "validate_labels",
]

#: What ``fit(..., nonfinite=...)`` does with calibration samples holding NaN or ±inf.
NONFINITE_POLICIES = ("drop", "raise")


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
        return batch_size(self.inputs)

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
    """The number of samples of a ``DataLoader``'s dataset (``None``: unknown, e.g. a loader
    without automatic batching, ``batch_size=None``, whose dataset items are batches)."""
    dataset = getattr(data, "dataset", None)
    if getattr(data, "batch_size", 1) is None:
        return None
    if isinstance(dataset, Sized):
        return len(dataset)
    return None


def as_batches(
    calib_data: Any, calib_labels: Any
) -> tuple[Iterator[tuple[Tensor, Any]], int | None]:
    """Normalise ``fit`` arguments to an iterator of ``(inputs, labels)`` batches.

    ``calib_data`` is either a tensor or a dict batch (one batch, with ``calib_labels``, or
    a dict carrying them under ``"labels"``) or an iterable of ``(inputs, labels)`` pairs,
    bare input tensors or dict batches (labels under ``"labels"``, as Hugging Face data
    collators produce) such as a ``DataLoader`` (then ``calib_labels`` must be omitted).
    Returns the iterator and the number of samples when it is known in advance.
    """
    if isinstance(calib_data, Tensor):
        return iter([(calib_data, calib_labels)]), len(calib_data)
    if isinstance(calib_data, Mapping):
        inputs, labels = split_labels(calib_data)
        if labels is not None and calib_labels is not None:
            msg = "`calib_labels` must be None when `calib_data` carries its labels under 'labels'"
            raise ValueError(msg)
        labels = calib_labels if labels is None else labels
        return iter([(inputs, labels)]), batch_size(inputs, name="calib_data")
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
            elif isinstance(item, Mapping):
                yield split_labels(item)
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                yield item[0], item[1]
            else:
                msg = (
                    f"Calibration batch {i} must be a tensor, a dict batch or an (inputs, "
                    "labels) pair "
                    f"(got {type(item).__name__})"
                )
                raise TypeError(msg)

    return batches(), _dataset_len(calib_data)


def example_batch(calib_data: Any) -> tuple[Tensor | None, int]:
    """A batch of ``calib_data`` (its first, for a stream) and the number of samples when
    known; ``(None, 0)`` for anything else (e.g. ``[]``)."""
    if isinstance(calib_data, Tensor):
        return (calib_data, len(calib_data)) if calib_data.ndim and len(calib_data) else (None, 0)
    if isinstance(calib_data, Mapping):
        inputs, _ = split_labels(calib_data)
        return inputs, batch_size(inputs, name="calib_data")
    if not isinstance(calib_data, Iterable) or isinstance(calib_data, str | bytes):
        return None, 0
    first = next(iter(calib_data), None)
    if isinstance(first, tuple | list) and first:
        first = first[0]
    if isinstance(first, Mapping):
        first, _ = split_labels(first)
    elif not isinstance(first, Tensor) or not first.ndim:
        return None, 0
    known = _dataset_len(calib_data)
    if known is not None:
        return first, known
    if isinstance(calib_data, Sized) and not hasattr(calib_data, "dataset"):
        return first, len(calib_data)
    return first, batch_size(first)


def concat_labels(labels: list[Any]) -> Any:
    """Concatenate per-batch labels (tensors, sequences or ``None``)."""
    if all(label is None for label in labels):
        return None
    if all(isinstance(label, Tensor) for label in labels):
        return labels[0] if len(labels) == 1 else torch.cat(labels)
    return list(chain.from_iterable(labels))


# -- the checked, filtered stream of one fit ----------------------------------------------------
def check_nonfinite_policy(nonfinite: object) -> str:
    """Return ``nonfinite`` if it is one of :data:`NONFINITE_POLICIES`, else raise."""
    if nonfinite not in NONFINITE_POLICIES:
        msg = f"`nonfinite` must be one of {list(NONFINITE_POLICIES)} (got {nonfinite!r})"
        raise ValueError(msg)
    return str(nonfinite)


def _label_count(labels: Any) -> int | None:
    """The number of per-sample labels in ``labels`` (``None``: not a per-sample object,
    e.g. ``None`` or ``...``, which only the scores that use labels refuse)."""
    if isinstance(labels, Tensor):
        return len(labels) if labels.ndim else None
    if isinstance(labels, str | bytes | Mapping) or not hasattr(labels, "__len__"):
        return None
    shape = getattr(labels, "shape", None)
    if shape is not None and len(shape) == 0:
        return None
    return len(labels)


def _n_samples(inputs: Any) -> int:
    """The batch size of a tensor or dict batch; 0 for anything the session refuses."""
    if isinstance(inputs, Tensor):
        return len(inputs) if inputs.ndim else 0
    if isinstance(inputs, Mapping):
        try:
            return batch_size(inputs, name="calib_data")
        except (TypeError, ValueError):
            return 0
    return 0


def _take_rows(labels: Any, keep: Tensor) -> Any:
    """The labels of the kept samples (``labels`` unchanged when not per sample)."""
    if isinstance(labels, Tensor):
        return labels[keep.to(labels.device)]
    if hasattr(labels, "__array__") and hasattr(labels, "shape"):  # numpy and the like
        return labels[keep.cpu().numpy()]
    return [label for label, kept in zip(labels, keep.tolist(), strict=True) if kept]


class CalibStream:
    """The ``(inputs, labels)`` batches of one fit, checked and filtered on the way.

    * Labels that are per sample (a tensor, an array or a sequence) must hold one entry per
      input: another length raises ``ValueError`` for every score, whether it reads labels
      or not (``None``, ``...`` and other non-sequences pass through untouched).
    * Samples holding a NaN or an infinite value are dropped with their labels (counted in
      :attr:`dropped`; see :meth:`warn`), or refused with a ``ValueError`` when
      ``nonfinite="raise"``. They never reach a forward pass nor the fitted state, so the fit
      equals a fit on the finite samples alone. A batch left empty is skipped.

    Args:
        batches: ``(inputs, labels)`` pairs (see :func:`as_batches`).
        nonfinite: ``"drop"`` or ``"raise"``.
        single: the batches are one tensor given to ``fit`` (messages name ``calib_labels``
            and no batch number).
    """

    def __init__(
        self, batches: Iterable[tuple[Any, Any]], nonfinite: str = "drop", *, single: bool = False
    ) -> None:
        self.nonfinite = check_nonfinite_policy(nonfinite)
        self._batches = batches
        self._single = single
        self.n_seen = 0
        self.dropped = 0

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for i, (inputs, labels) in enumerate(self._batches):
            n = _n_samples(inputs)
            if not n:
                yield inputs, labels  # refused by the fit session's input checks
                continue
            where = "" if self._single else f" (calibration batch {i})"
            n_labels = _label_count(labels)
            if n_labels is not None and n_labels != n:
                shape = tuple(labels.shape) if hasattr(labels, "shape") else f"{n_labels} labels"
                expected = f"({n},)" if getattr(labels, "ndim", 1) <= 1 else (f"({n}, ...)")
                msg = (
                    f"`calib_labels` must have shape {expected}, one label per sample "
                    f"(got {shape}){where}"
                )
                raise ValueError(msg)
            self.n_seen += n
            bad = nonfinite_rows(inputs)
            if bad is not None:
                count = int(bad.sum())
                if self.nonfinite == "raise":
                    first = int(bad.nonzero()[0, 0])
                    msg = (
                        f"`calib_data` holds {count} sample(s) with non-finite values (NaN or "
                        f"±inf), the first at row {first}{where}; `nonfinite='raise'` refuses "
                        "them (the default, 'drop', fits on the finite samples with a warning)"
                    )
                    raise ValueError(msg)
                self.dropped += count
                keep = ~bad
                inputs = take_rows(inputs, keep)
                if n_labels is not None:
                    labels = _take_rows(labels, keep)
                if count == n:
                    continue
            yield inputs, labels

    def warn(self, *, stacklevel: int = 2) -> None:
        """One warning saying how many samples were dropped (none: no warning)."""
        if not self.dropped:
            return
        kept = self.n_seen - self.dropped
        msg = (
            f"{self.dropped} of the {self.n_seen} calibration samples hold non-finite values "
            f"(NaN or ±inf) and were dropped: the score is fit on the {kept} others (pass "
            "`nonfinite='raise'` to refuse them instead)"
        )
        warnings.warn(msg, UserWarning, stacklevel=stacklevel + 1)


class StreamingCalibration:
    """Mixin for scores calibrated batch by batch (list it before the score base class).

    Subclasses implement ``_calib_update(batch)`` (store what the score needs in
    ``self._state``, a :class:`~scio.scores.core.calibration.CalibState`) and ``_calib_end()``
    (compute the fitted state from it). ``calibrate(data, labels)`` then simply runs the
    stream with a single batch.
    """

    _state: CalibState

    def calibrate(self, calib_data: Tensor, calib_labels: Any) -> None:
        """Calibrate from one tensor (``fit`` streams batches directly)."""
        score: Any = self
        score._calib_start()
        prepare = getattr(score, "_calib_prepare", None)
        if prepare is not None:
            prepare(score.rnet, calib_data)
        score._calib_update(CalibBatch(calib_data, calib_labels, score.rnet))
        score._calib_end()

    def _calib_start(self) -> None:
        self._state = CalibState()

    def _calib_update(self, batch: CalibBatch) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _calib_end(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class NoCalibration(StreamingCalibration):
    """Mixin for scores with nothing to learn (logit-based scores): calibration reads no
    batch, so it runs no forward pass."""

    def _calib_update(self, batch: CalibBatch) -> None:
        """Nothing to learn."""

    def _calib_end(self) -> None:
        """Nothing to learn."""
