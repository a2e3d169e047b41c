"""One calibration run of a score: the push-style session that streams batches into it."""

from __future__ import annotations

from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scio.scores.core.protocol import FittableScore
from scio.scores.core.validation import (
    InputDtypeError,
    check_device,
    check_dtype,
    check_inputs,
    eval_mode,
)

if TYPE_CHECKING:
    from scio.recorder import Recorder
    from scio.scores.core.calibration import CalibBatch

__all__ = ["FitSession", "explain_forward_error"]


class FitSession:
    """One calibration of ``score``: ``update`` per batch, then ``finish``.

    Push-style, so that several scores can consume the batches of one shared forward pass
    (see :func:`scio.scores.fit_jointly`). Time spent outside (e.g. a shared forward) can be
    charged with :meth:`charge`. If anything fails, the score is restored exactly as it was
    before the session (:meth:`rollback`: still unfit, or still holding its previous fitted
    state) and no duration is stored.
    """

    def __init__(
        self, score: FittableScore, rnet: Recorder, n_known: int | None, *, group: Any = None
    ) -> None:
        self.group = group  # torch.distributed group to merge over (None: single process)
        self._before = dict(score.__dict__)  # what a failed fit restores
        self._attrs_before = set(self._before)
        taps = getattr(rnet, "_taps", None)
        self._taps_before = None if taps is None else set(taps)
        self._rnet = rnet
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
        self.input_dtype: torch.dtype | None = torch.float32
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
            try:
                prepare(self.score.rnet, probe)
            except RuntimeError as exc:  # its probe forward failed
                explain_forward_error(exc, probe, self.score.rnet)
                raise
            self.duration += perf_counter() - start

    def charge(self, seconds: float) -> None:
        """Add time spent on this calibration elsewhere (e.g. a shared forward pass)."""
        self.duration += seconds

    def update(self, batch: CalibBatch) -> None:
        """Feed one batch to the score."""
        start = perf_counter()
        inputs = self.score._score_input(batch.inputs)
        rnet = self.score.rnet
        check_inputs(inputs, self.input_shape, name="calib_data", keys=rnet._input_keys)
        check_device(inputs, rnet.net, name="calib_data")
        if isinstance(inputs, Mapping):  # dict batch: no per-sample shape (e.g. padded text)
            self.input_shape = self.input_dtype = None
            for key, tensor in inputs.items():
                if isinstance(tensor, Tensor):
                    check_dtype(tensor, rnet.net, name=f"calib_data[{key!r}]")
        else:
            self.input_shape = tuple(inputs.shape[1:])
            self.input_dtype = inputs.dtype
            check_dtype(inputs, rnet.net, name="calib_data")
        if not self._prepared:
            self.prepare(batch.inputs)
        grad = torch.enable_grad() if self._grad else torch.no_grad()
        with grad, eval_mode(self.score.rnet.net):
            try:
                self.score._calib_update(batch)
            except RuntimeError as exc:
                explain_forward_error(exc, batch.inputs, self.score.rnet)
                raise
        self.n_samples += len(batch)
        self.duration += perf_counter() - start

    def rollback(self) -> None:
        """Restore the score exactly as it was before the session (its attributes, fitted
        state and recorder binding), and remove the input taps the session added to the
        recorder. Idempotent; called on every failure."""
        state = self.score.__dict__
        for key in [key for key in state if key not in self._before]:
            del state[key]
        state.update(self._before)
        taps = getattr(self._rnet, "_taps", None)
        if taps is None or self._taps_before is None:
            return
        added = [module for module in taps if module not in self._taps_before]
        for module in added:
            del taps[module]
        if added:
            self._rnet._sync_hooks()

    def abort(self, exc: BaseException) -> None:
        """After ``exc`` ended this rank's stream: restore the score (:meth:`rollback`) and
        report it to the other ranks (distributed fits; they raise instead of waiting in the
        merge)."""
        self.rollback()
        if self.group is None:
            return
        from scio.scores.core.distributed import report_failure

        report_failure(self.group, exc)

    def finish(self) -> None:
        """Compute the fitted state, mark the score fit and store the duration (on failure,
        :meth:`rollback` and re-raise)."""
        try:
            self._finish()
        except BaseException:
            self.rollback()
            raise

    def _finish(self) -> None:
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


def explain_forward_error(
    exc: RuntimeError, inputs: Tensor, rnet: Any, *, name: str = "calib_data"
) -> None:
    """If a forward failed on samples of another shape than the Recorder was built with, or
    on integer inputs to a floating network, raise an error that says so and names the
    argument (chained to the original one); else return."""
    if not isinstance(inputs, Tensor):  # a dict batch: torch's own error says enough
        return
    _explain_shape_mismatch(exc, inputs, rnet, name)
    net = getattr(rnet, "net", None)
    if inputs.is_floating_point() or inputs.is_complex() or not isinstance(net, torch.nn.Module):
        return
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return
    kind = str(dtype).removeprefix("torch.")
    msg = (
        f"The forward pass failed on `{name}` of dtype "
        f"{str(inputs.dtype).removeprefix('torch.')} ({exc}); the network computes in {kind}: "
        f"unless it takes integer inputs, convert them with `{name}.to(torch.{kind})`"
    )
    raise InputDtypeError(msg) from exc


def _explain_shape_mismatch(exc: RuntimeError, inputs: Tensor, rnet: Any, name: str) -> None:
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
        f"The forward pass failed on `{name}` samples of shape {got}, but the Recorder was "
        f"built for samples of shape {expected}: build it with "
        f"`Recorder(net, input_data={name}[:1])`"
    )
    raise RuntimeError(msg) from exc
