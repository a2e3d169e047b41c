"""The two short ``fit`` paths of :meth:`BaseScore.fit <scio.scores.core.base.BaseScore.fit>`
that run no calibration stream: scores with nothing to learn, and scores written against
the reference's contract given a placeholder instead of a recorder."""

from __future__ import annotations

from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from torch import Tensor

from scio.recorder.io import batch_size
from scio.scores.core.calibration import CalibStream, example_batch

if TYPE_CHECKING:
    from scio.scores.core.protocol import FittableScore

__all__ = ["fit_reference", "fit_without_data"]


def fit_without_data(
    score: FittableScore,
    rnet: Any,
    calib_data: Any,
    calib_labels: Any = None,
    nonfinite: str = "drop",
) -> None:
    """Fit a score with nothing to learn: as the reference, ``rnet`` is stored without
    inspection and any ``calib_data`` / labels are accepted (a tensor still sets the input
    shape and dtype checked at inference and saved with the score, and goes through the
    label-count and non-finite checks of every fit)."""
    start = perf_counter()
    example, n = example_batch(calib_data)
    if isinstance(calib_data, Tensor | Mapping):
        checked = CalibStream([(calib_data, calib_labels)], nonfinite, single=True)
        for _ in checked:  # checks the labels' count, drops or refuses non-finite rows
            pass
        checked.warn(stacklevel=3)
        n -= checked.dropped
    score._check_params(n)
    score.unfit()
    score._rnet = rnet
    score._fit_input_shape = tuple(example.shape[1:]) if isinstance(example, Tensor) else None
    # the inputs' dtype is checked at inference, unless the data were floating inputs of
    # another dtype than the network's (accepted, as in the reference): then the inputs
    # must only have the network's
    dtype = example.dtype if isinstance(example, Tensor) else None
    first = getattr(rnet, "__dict__", {}).get("_first_param")
    if dtype is not None and dtype.is_floating_point and getattr(first, "dtype", None) != dtype:
        dtype = None
    score._fit_input_dtype = dtype
    score._fit_n_samples = n
    score.timer.add("calibration", n, perf_counter() - start)
    score._is_fit = True


def fit_reference(score: FittableScore, rnet: Any, calib_data: Any, calib_labels: Any) -> None:
    """The reference's ``fit`` for a score written against its contract (``calibrate`` /
    ``get_conformity``) given something else than a Recorder or a network, e.g. a
    placeholder ``...`` for a score that never runs one: ``rnet`` is bound as it is and
    ``calibrate(calib_data, calib_labels)`` runs once, timed. The network is used only where
    the score's own code uses it."""
    if isinstance(calib_data, Mapping):
        n = batch_size(calib_data, name="calib_data")
    else:
        n = len(calib_data)
    score._check_params(n)
    score.unfit()
    score._rnet = rnet
    with score.timer("calibration", n_samples=n):
        score.calibrate(calib_data, calib_labels)
    example, _ = example_batch(calib_data)
    score._fit_input_shape = tuple(example.shape[1:]) if isinstance(example, Tensor) else None
    score._fit_input_dtype = None
    score._fit_n_samples = n
    score._is_fit = True
