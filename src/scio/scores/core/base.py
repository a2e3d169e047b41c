"""The score life cycle: hyper-parameters, ``fit`` (calibration), ``__call__`` (inference).

A score is a :class:`~scio.utils.params.ParamClass`: hyper-parameters are set in the
constructor, learned state only by :meth:`BaseScore.fit`. Changing a hyper-parameter
"unfits" the score. Calibration accepts one tensor or an iterable of ``(inputs, labels)``
batches (e.g. a ``DataLoader``) and gives the same fitted state for both.

Writing a score: either implement the reference contract ``calibrate(calib_data,
calib_labels)`` + ``get_conformity(inputs)`` (batches are then concatenated before
``calibrate``), or use :class:`StreamingCalibration` and implement the batch protocol
``_calib_update(batch)`` + ``_calib_end()`` so that nothing but the needed features is kept.
"""

from __future__ import annotations

import math
import os
import threading
from abc import abstractmethod
from collections.abc import Iterable
from time import perf_counter
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from scio.scores.core.calibration import CalibBatch, CalibState, as_batches, concat_labels
from scio.scores.core.session import FitSession
from scio.scores.core.validation import check_device, check_inputs, eval_mode
from scio.scores.utils import normalize_samples
from scio.serialization import register_score, save_score
from scio.utils.misc import ScoreTimer, check
from scio.utils.params import MISSING, ParamClass

if TYPE_CHECKING:
    from scio.recorder import Recorder

__all__ = ["BaseScore", "FitSession", "NoCalibration", "ParamError", "StreamingCalibration"]


def _same_value(a: object, b: object) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # tensors and other values without a boolean equality
        return False


_TIMER_LOCK = threading.Lock()


class ParamError(AssertionError, ValueError):
    """An invalid hyper-parameter (an ``AssertionError`` as in the reference, and a
    ``ValueError`` with a message naming it)."""


class BaseScore(ParamClass):
    """Base class of every confidence score (higher conformity = more in-distribution).

    Args:
        act_norm: if not ``None``, every recorded activation is divided by its per-sample
            ``act_norm``-norm before use (see :func:`scio.scores.utils.normalize_samples`).
    """

    act_norm: float | None = None

    #: Names of the attributes set by calibration (the fitted state, used by save/load).
    #: Values are tensors, :class:`~scio.scores.utils.Index` objects, plain Python values,
    #: or tuples/lists/dicts of those.
    _fitted_attrs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith("scio."):  # the built-in scores load by name
            register_score(cls)

    def __init__(self, *post_init: Any, **params: Any) -> None:
        # positional arguments go to ``__post_init__``, as with the reference's paramclasses
        self._is_fit = False
        super().__init__(*post_init, **params)

    # -- contract ---------------------------------------------------------------------------
    @abstractmethod
    def calibrate(self, calib_data: Tensor, calib_labels: Any) -> None:
        """Learn the score's state from calibration data (called by :meth:`fit`)."""

    @abstractmethod
    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(out, conformity)`` for ``inputs`` (called by :meth:`__call__`)."""

    def _check_params(self, n_calib: int) -> None:
        """Validate hyper-parameters before calibration (subclasses call ``super()``)."""
        missing = self.missing_params
        if missing:
            msg = f"Missing parameters for {type(self).__qualname__} score: {missing}"
            raise RuntimeError(msg)
        if self.act_norm is not None:
            check(self.act_norm != 0)
            check(not math.isnan(self.act_norm))
        k = self.params.get("k")
        if isinstance(k, int) and not 0 < k <= n_calib:
            msg = f"`k` must satisfy 0 < k <= n_calib = {n_calib} calibration samples (got k={k})"
            raise ParamError(msg)

    def _on_param_will_be_set(self, attr: str, future_val: Any) -> None:
        if not _same_value(self.params.get(attr, MISSING), future_val):
            self.unfit()

    # -- batch protocol (default: reference contract, batches concatenated) ------------------
    def _calib_start(self) -> None:
        """Reset the calibration state before a stream of batches."""
        self._calib_buffer: list[tuple[Tensor, Any]] = []

    def _calib_update(self, batch: CalibBatch) -> None:
        """Consume one calibration batch."""
        self._calib_buffer.append((batch.inputs, batch.labels))

    def _calib_end(self) -> None:
        """Finish calibration once every batch was consumed."""
        buffer, self._calib_buffer = self._calib_buffer, []
        if not buffer:
            msg = "`calib_data` is empty: calibration needs at least one sample"
            raise ValueError(msg)
        inputs = [inputs for inputs, _ in buffer]
        data = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        labels = buffer[0][1] if len(buffer) == 1 else concat_labels([y for _, y in buffer])
        self.calibrate(data, labels)

    # -- life cycle -------------------------------------------------------------------------
    @property
    def is_fit(self) -> bool:
        """Whether the score is calibrated and ready for inference."""
        return self._is_fit

    def unfit(self) -> None:
        """Mark the score as not fitted."""
        self._is_fit = False

    @property
    def rnet(self) -> Recorder:
        """The recorder bound at the latest :meth:`fit`."""
        try:
            rnet: Recorder = self.__dict__["_rnet"]
            return rnet
        except KeyError:
            msg = f"{type(self).__name__} has no recorder yet: call `fit` first"
            raise AttributeError(msg) from None

    def fit(
        self, rnet: Recorder, calib_data: Any, calib_labels: Any = None, *, distributed: Any = False
    ) -> BaseScore:
        """Calibrate the score on in-distribution data and return it.

        Args:
            rnet: a :class:`~scio.recorder.Recorder` recording the layers the score uses.
            calib_data: a tensor of inputs, or an iterable of ``(inputs, labels)`` batches
                (e.g. a ``DataLoader``); both give the same fitted state.
            calib_labels: labels of ``calib_data`` when it is a tensor (only used by scores
                that need labels).
            distributed: ``True`` (default world group) or a ``torch.distributed`` process
                group: ``calib_data`` is this rank's shard and the calibration states of
                every rank are merged, so all ranks get the score fit on the rank-ordered
                union (see :mod:`scio.scores.core.distributed`). Every rank must call ``fit``.
        """
        from scio.scores.core.distributed import resolve_group

        group = resolve_group(distributed)
        if (
            isinstance(self, NoCalibration)
            and group is None
            and not hasattr(self, "_calib_prepare")
        ):
            return self._fit_without_data(rnet, calib_data)  # nothing to learn nor bind
        _check_recorder(rnet, self)
        batches, n_known = as_batches(calib_data, calib_labels)
        stream = (CalibBatch(inputs, labels, rnet) for inputs, labels in batches)
        return self._fit_stream(rnet, stream, n_known, group=group)

    def _fit_without_data(self, rnet: Any, calib_data: Any) -> BaseScore:
        """Fit a score with nothing to learn: as the reference, ``rnet`` is stored without
        inspection and any ``calib_data`` / labels are accepted (a tensor still sets the input
        shape checked at inference and saved with the score)."""
        start = perf_counter()
        example, n = _example_batch(calib_data)
        self._check_params(n)
        self.unfit()
        self._rnet = rnet
        self._fit_input_shape = tuple(example.shape[1:]) if example is not None else None
        self._fit_input_dtype = example.dtype if example is not None else torch.float32
        self._fit_n_samples = n
        self.timer.add("calibration", n, perf_counter() - start)
        self._is_fit = True
        return self

    def _fit_stream(
        self,
        rnet: Recorder,
        batches: Iterable[CalibBatch],
        n_known: int | None,
        *,
        group: Any = None,
    ) -> BaseScore:
        """Run calibration on a stream of batches."""
        session = FitSession(self, rnet, n_known, group=group)
        try:
            for batch in batches:
                session.update(batch)
        except Exception as exc:
            session.abort(exc)
            raise
        session.finish()
        return self

    @property
    def _calib_needs_grad(self) -> bool:
        """Whether calibration needs autograd (else it runs under ``torch.no_grad``)."""
        return False

    @property
    def _inference_needs_grad(self) -> bool:
        """Whether inference needs autograd (e.g. input perturbations)."""
        return False

    def __call__(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(out, conformity)``: the network output and the confidence scores."""
        self._check_ready(inputs)
        with self.timer("inference", n_samples=len(inputs)):
            return self._infer(inputs)

    def _bind_taps(self) -> None:
        """Tap (``Recorder._tap``) every module input the score reads at inference, so that
        a shared forward (:class:`scio.scores.JointInference`) captures them too."""

    def _check_ready(self, inputs: Tensor) -> None:
        """Raise unless the score is fit and ``inputs`` is a valid batch for it."""
        if not self._is_fit:
            msg = "The score needs to be fit before inference"
            raise RuntimeError(msg)
        check_inputs(inputs, self.__dict__.get("_fit_input_shape"), name="inputs")
        rnet = self.rnet
        first = rnet.__dict__.get("_first_param")  # cached: the check is on every call
        if first is None or first.device != inputs.device:
            check_device(inputs, rnet.net, name="inputs")

    def _infer(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Inference on checked inputs, without timing (see :meth:`__call__`)."""
        grad = torch.enable_grad() if self._inference_needs_grad else torch.no_grad()
        rnet = self.rnet
        modules = rnet.__dict__.get("_modules_seen", ())
        if modules and not any(module.training for module in modules):
            with grad:  # fast path: every module the network calls is in eval mode
                return self._process(inputs)
        with grad, eval_mode(rnet.net):
            return self._process(inputs)

    def _process(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        return self.get_conformity(inputs)

    # -- helpers ----------------------------------------------------------------------------
    def normalize(
        self, activations: tuple[Tensor, ...], *, concatenate: bool = False
    ) -> tuple[Tensor, ...]:
        """Apply ``act_norm`` to raw activations (optionally flattened and concatenated)."""
        if not activations:
            msg = (
                f"{type(self).__name__} needs at least one recorded layer, but its Recorder "
                "records none: call `rnet.record(...)` with the layers to use (listed by "
                "`print(rnet)`) before `fit`"
            )
            raise ValueError(msg)
        if concatenate:
            activations = (torch.cat([a.reshape(len(a), -1) for a in activations], dim=1),)
        return tuple(normalize_samples(a, ord=self.act_norm) for a in activations)

    def activations(self, *, concatenate: bool = False) -> tuple[Tensor, ...]:
        """Activations of the latest recorder forward, ``act_norm``-normalised."""
        return self.normalize(tuple(self.rnet.activations.values()), concatenate=concatenate)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the fitted score (see :func:`scio.load_score` to load it next to a network)."""
        save_score(self, path)

    @property
    def timer(self) -> ScoreTimer:
        """Durations of every calibration and inference (see ``timer.report``)."""
        timer = self.__dict__.get("_timer")
        if timer is None:
            with _TIMER_LOCK:  # concurrent first calls share one timer
                timer = self.__dict__.get("_timer")
                if timer is None:
                    timer = self._timer = ScoreTimer(self)
        return timer

    def reset_timer(self) -> None:
        """Discard every recorded duration."""
        self.__dict__.pop("_timer", None)

    def __repr__(self) -> str:
        status = "fit" if self._is_fit else "unfit"
        return f"{type(self).__name__}[{status}]({self._params_repr(only_non_default=False)})"


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


def _example_batch(calib_data: Any) -> tuple[Tensor | None, int]:
    """A batch of ``calib_data`` (its first, for a stream) and the number of samples when
    known; ``(None, 0)`` for anything else (e.g. ``[]``)."""
    if isinstance(calib_data, Tensor):
        return (calib_data, len(calib_data)) if calib_data.ndim and len(calib_data) else (None, 0)
    if not isinstance(calib_data, Iterable) or isinstance(calib_data, str | bytes):
        return None, 0
    first = next(iter(calib_data), None)
    if isinstance(first, tuple | list) and first:
        first = first[0]
    if not isinstance(first, Tensor) or not first.ndim:
        return None, 0
    dataset = getattr(calib_data, "dataset", calib_data)
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        n = len(first)
    return first, n


def _check_recorder(rnet: Any, score: BaseScore) -> None:
    """One sentence saying what to do when ``rnet`` is not a :class:`Recorder`."""
    from scio.recorder import Recorder

    if isinstance(rnet, Recorder):
        return
    plain = isinstance(rnet, torch.nn.Module)
    what = f"a plain nn.Module, {type(rnet).__name__}" if plain else type(rnet).__name__
    msg = (
        f"`rnet` must be a scio Recorder (got {what}): wrap your network with "
        f"`rnet = Recorder(net, input_data=calib_data[:1])`, record the layers "
        f"{type(score).__name__} uses with `rnet.record(...)`, then call `fit(rnet, ...)`"
    )
    raise TypeError(msg)


class NoCalibration(StreamingCalibration):
    """Mixin for scores with nothing to learn (logit-based scores): calibration reads no
    batch, so it runs no forward pass."""

    def _calib_update(self, batch: CalibBatch) -> None:
        """Nothing to learn."""

    def _calib_end(self) -> None:
        """Nothing to learn."""
