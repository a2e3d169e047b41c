"""One calibration run of a score: the push-style session that streams batches into it."""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scio.scores.core.protocol import FittableScore
from scio.scores.core.validation import check_device, check_dtype, check_inputs, eval_mode

if TYPE_CHECKING:
    from scio.recorder import Recorder
    from scio.scores.core.calibration import CalibBatch

__all__ = ["FitSession"]


class FitSession:
    """One calibration of ``score``: ``update`` per batch, then ``finish``.

    Push-style, so that several scores can consume the batches of one shared forward pass
    (see :func:`scio.scores.fit_jointly`). Time spent outside (e.g. a shared forward) can be
    charged with :meth:`charge`. If anything fails, the score stays unfit and no duration
    is stored.
    """

    def __init__(
        self, score: FittableScore, rnet: Recorder, n_known: int | None, *, group: Any = None
    ) -> None:
        self.group = group  # torch.distributed group to merge over (None: single process)
        self._attrs_before = set(score.__dict__)
        if group is not None:
            n_known = None  # a shard's size: the global count is known after the merge
        if n_known == 0:
            msg = "`calib_data` must hold at least one sample (got an empty calibration set)"
            raise ValueError(msg)
        if n_known is not None:
            score._check_params(n_known)
        score.unfit()
        score._rnet = rnet
        self.score = score
        self.n_known = n_known
        self.n_samples = 0
        self.duration = 0.0
        self.input_shape: tuple[int, ...] | None = None
        self.input_dtype = torch.float32
        self._grad = score._calib_needs_grad
        self._prepared = False
        start = perf_counter()
        score._calib_start()
        self.duration += perf_counter() - start

    def prepare(self, probe: Tensor) -> None:
        """Let the score bind to the network on the first inputs, before any forward
        (e.g. find a classifier head and tap its input). Runs once; ``update`` calls it."""
        if self._prepared:
            return
        self._prepared = True
        prepare = getattr(self.score, "_calib_prepare", None)
        if prepare is not None:
            start = perf_counter()
            prepare(self.score.rnet, probe)
            self.duration += perf_counter() - start

    def charge(self, seconds: float) -> None:
        """Add time spent on this calibration elsewhere (e.g. a shared forward pass)."""
        self.duration += seconds

    def update(self, batch: CalibBatch) -> None:
        """Feed one batch to the score."""
        start = perf_counter()
        check_inputs(batch.inputs, self.input_shape, name="calib_data")
        self.input_shape = tuple(batch.inputs.shape[1:])
        self.input_dtype = batch.inputs.dtype
        if self.n_samples == 0:
            check_device(batch.inputs, self.score.rnet.net, name="calib_data")
            check_dtype(batch.inputs, self.score.rnet.net, name="calib_data")
        if not self._prepared:
            self.prepare(batch.inputs)
        grad = torch.enable_grad() if self._grad else torch.no_grad()
        with grad, eval_mode(self.score.rnet.net):
            try:
                self.score._calib_update(batch)
            except RuntimeError as exc:
                _explain_shape_mismatch(exc, batch.inputs, self.score.rnet)
                raise
        self.n_samples += len(batch)
        self.duration += perf_counter() - start

    def abort(self, exc: BaseException) -> None:
        """After ``exc`` ended this rank's stream: report it to the other ranks (distributed
        fits; they raise instead of waiting in the merge). The score stays unfit."""
        if self.group is None:
            return
        from scio.scores.core.distributed import report_failure

        report_failure(self.group, exc)

    def finish(self) -> None:
        """Compute the fitted state, mark the score fit and store the duration."""
        score = self.score
        start = perf_counter()
        n_total = self.n_samples
        if self.group is not None:
            from scio.scores.core.distributed import merge_session

            n_total = merge_session(self.group, score, self, self._attrs_before)
        if n_total == 0:
            msg = "`calib_data` must hold at least one sample (got an empty calibration set)"
            raise ValueError(msg)
        if self.n_known != n_total:
            score._check_params(n_total)
        grad = torch.enable_grad() if self._grad else torch.no_grad()
        with grad, eval_mode(score.rnet.net):
            score._calib_end()
        score.__dict__.pop("_state", None)  # keep only the fitted state, not the features
        score._fit_input_shape = self.input_shape
        score._fit_input_dtype = self.input_dtype
        score._fit_n_samples = n_total
        self.duration += perf_counter() - start
        score.timer.add("calibration", self.n_samples, self.duration)
        score._is_fit = True


def _explain_shape_mismatch(exc: RuntimeError, inputs: Tensor, rnet: Any) -> None:
    """If a forward failed on samples of another shape than the Recorder was built with,
    raise an error that says so (chained to the original one)."""
    summary = getattr(rnet, "summary", None)
    built = getattr(summary, "input_size", None)
    if isinstance(built, list) and len(built) == 1:
        built = built[0]
    if not isinstance(built, tuple | torch.Size) or len(built) < 1:
        return
    expected, got = tuple(built)[1:], tuple(inputs.shape[1:])
    if expected == got:
        return
    msg = (
        f"The forward pass failed on `calib_data` samples of shape {got}, but the Recorder was "
        f"built for samples of shape {expected}: build it with "
        "`Recorder(net, input_data=calib_data[:1])`"
    )
    raise RuntimeError(msg) from exc
