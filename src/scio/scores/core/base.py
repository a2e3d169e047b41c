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
from collections.abc import Iterable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from scio.recorder.io import batch_size, concat_batches, map_tensors, take_rows, unwrap_single
from scio.scores.core.calibration import (
    CalibBatch,
    CalibStream,
    NoCalibration,
    StreamingCalibration,
    as_batches,
    check_nonfinite_policy,
    concat_labels,
)
from scio.scores.core.fit_paths import fit_reference, fit_without_data
from scio.scores.core.session import FitSession, explain_forward_error
from scio.scores.core.validation import (
    COMMON_PARAM_RANGES,
    ParamError,
    ParamRange,
    check_act_norm,
    check_device,
    check_input_dtype,
    check_inputs,
    check_param_range,
    check_recorder,
    check_tensor_inputs,
    eval_mode,
    merge_rows,
    nonfinite_rows,
    range_of,
)
from scio.scores.utils import normalize_samples
from scio.serialization import register_score, save_score
from scio.utils.misc import ScoreTimer, check_not_abstract
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

    #: Valid range of each hyper-parameter, checked at construction, at every assignment
    #: (``set_params`` included, before any is set) and at ``fit``, with a :class:`ParamError`
    #: naming the parameter, its value and the range. Subclasses add theirs (merged along
    #: the MRO); parameters shared by many scores are listed here once. Constraints between
    #: parameters or on the number of calibration samples stay in ``_check_params``.
    _merged_ranges: ClassVar[dict[str, ParamRange] | None] = None
    _param_ranges: ClassVar[Mapping[str, ParamRange]] = COMMON_PARAM_RANGES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith("scio."):  # the built-in scores load by name
            register_score(cls)

    def __new__(cls, *_post_init: Any, **_params: Any) -> BaseScore:
        check_not_abstract(cls)  # the same message on every Python version
        return super().__new__(cls)

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
        for name, value in self.params.items():
            check_param_range(self, name, value, type(self)._range_of(name))
        check_act_norm(self.act_norm)  # at fit only, as the reference (docs/errors.md)
        k = self.params.get("k")
        if isinstance(k, int) and not 0 < k <= n_calib:
            msg = f"`k` must satisfy 0 < k <= n_calib = {n_calib} calibration samples (got k={k})"
            raise ParamError(msg)

    @classmethod
    def _range_of(cls, name: str) -> ParamRange | None:
        """The valid range of parameter ``name`` (``None``: not checked)."""
        return range_of(cls, name)

    def _check_param_value(self, name: str, value: Any) -> None:
        super()._check_param_value(name, value)  # the annotation (TypeError)
        if value is not MISSING:
            check_param_range(self, name, value, type(self)._range_of(name))

    #: Hyper-parameters read only at inference or bounding memory (e.g. ``max_batch``):
    #: changing one keeps the fitted state (their ranges are still checked on assignment).
    _keeps_fit: ClassVar[frozenset[str]] = frozenset()

    def _on_param_will_be_set(self, attr: str, future_val: Any) -> None:
        if attr in type(self)._keeps_fit:
            return
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
        data = concat_batches(inputs)
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
        self,
        rnet: Recorder,
        calib_data: Any,
        calib_labels: Any = None,
        *,
        distributed: Any = False,
        nonfinite: str = "drop",
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
            nonfinite: what to do with calibration samples holding NaN or ±inf: ``"drop"``
                (default: they are left out with their labels, and one warning says how
                many) or ``"raise"`` (``ValueError``). Either way they never reach the
                fitted state.

        Raises:
            ValueError, TypeError, ParamError: see ``docs/errors.md``. A ``fit`` that raises
                leaves the score as it was (unfit, or with its previous fitted state).
        """
        from scio.scores.core.distributed import resolve_group

        check_nonfinite_policy(nonfinite)
        group = resolve_group(distributed)
        if (
            isinstance(self, NoCalibration)
            and group is None
            and not hasattr(self, "_calib_prepare")
        ):  # nothing to learn nor bind
            fit_without_data(self, rnet, calib_data, calib_labels, nonfinite)
            return self
        if group is None and _is_placeholder(rnet) and not isinstance(self, StreamingCalibration):
            fit_reference(self, rnet, calib_data, calib_labels)
            return self
        check_recorder(rnet, type(self).__name__)
        batches, n_known = as_batches(calib_data, calib_labels)
        checked = CalibStream(batches, nonfinite, single=isinstance(calib_data, Tensor | Mapping))
        key = rnet.__dict__["_input_key"]
        stream = (
            CalibBatch(unwrap_single(inputs, key), labels, rnet) for inputs, labels in checked
        )
        return self._fit_stream(rnet, stream, n_known, group=group, checked=checked)

    def _fit_stream(
        self,
        rnet: Recorder,
        batches: Iterable[CalibBatch],
        n_known: int | None,
        *,
        group: Any = None,
        checked: CalibStream | None = None,
    ) -> BaseScore:
        """Run calibration on a stream of batches (``checked``: the stream that filtered
        them, whose count of dropped samples is reported once it is consumed). If anything
        raises, the score is restored as it was before (:meth:`FitSession.rollback`)."""
        session = FitSession(self, rnet, n_known, group=group)
        try:
            for batch in batches:
                session.update(batch)
        except Exception as exc:
            session.abort(exc)
            raise
        if checked is not None:
            checked.warn(stacklevel=3)
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
        """Return ``(out, conformity)``: the network output and the confidence scores.

        ``inputs`` is a tensor batch, or a dict batch for a network called as
        ``net(**batch)`` (a recorder built on a dict ``input_data``)."""
        if isinstance(inputs, Mapping):
            rnet = self.__dict__.get("_rnet")
            inputs = unwrap_single(inputs, getattr(rnet, "__dict__", {}).get("_input_key"))
        self._check_ready(inputs)
        start = perf_counter()
        result = self._infer(inputs)
        self.timer.add("inference", batch_size(inputs), perf_counter() - start)
        return result

    @property
    def _acts_on_inputs(self) -> bool:
        """Whether the score works in input space (perturbations, input gradients,
        squeezing): it then needs a tensor batch, not a dict of several tensors. Default:
        whether inference takes gradients (with respect to the inputs)."""
        return self._inference_needs_grad

    def _score_input(self, inputs: Any, name: str = "calib_data") -> Any:
        """``inputs`` after the check that a dict batch suits the score."""
        if isinstance(inputs, Mapping) and self._acts_on_inputs:
            check_tensor_inputs(inputs, type(self).__name__, name=name)
        return inputs

    def _bind_taps(self) -> None:
        """Tap (``Recorder._tap``) every module input the score reads at inference, so that
        a shared forward (:class:`scio.scores.JointInference`) captures them too."""

    def _check_ready(self, inputs: Tensor) -> None:
        """Raise unless the score is fit and ``inputs`` is a valid batch for it."""
        if not self._is_fit:
            msg = "The score needs to be fit before inference"
            raise RuntimeError(msg)
        rnet = self.rnet
        placeholder = _is_placeholder(rnet)
        keys = None if placeholder else rnet.__dict__.get("_input_keys")
        check_inputs(inputs, self.__dict__.get("_fit_input_shape"), name="inputs", keys=keys)
        if placeholder:  # no network to check against (see `fit_reference`)
            return
        first = rnet.__dict__.get("_first_param")  # cached: the check is on every call
        if isinstance(inputs, Mapping):
            self._score_input(inputs, "inputs")
            check_device(inputs, rnet.net, name="inputs")
            for key, tensor in inputs.items():
                if isinstance(tensor, Tensor):
                    check_input_dtype(tensor, None, first, name=f"inputs[{key!r}]")
            return
        if first is None or first.device != inputs.device:
            check_device(inputs, rnet.net, name="inputs")
        check_input_dtype(inputs, self.__dict__.get("_fit_input_dtype"), first, name="inputs")

    def _infer(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Inference on checked inputs, without timing (see :meth:`__call__`).

        Samples holding a NaN or an infinite value never reach the score: it runs on the
        finite samples alone, so their results are exactly those of the batch without the
        others (whatever the method: input gradients, batch statistics, ...); the others
        get their own network output (one forward of just those rows) and a NaN conformity.
        """
        if self._inference_needs_grad and torch.is_inference_mode_enabled():
            # the caller's inference mode forbids autograd: leave it locally, and give the
            # score an ordinary copy of the inputs (inference tensors cannot take gradients)
            with torch.inference_mode(False):
                return self._infer(map_tensors(inputs, torch.clone))
        rnet = self.rnet
        if _is_placeholder(rnet):  # the score's own code only (see `fit_reference`)
            with torch.enable_grad() if self._inference_needs_grad else torch.no_grad():
                return self._process(inputs)
        bad = nonfinite_rows(inputs)
        modules = rnet.__dict__.get("_modules_seen", ())
        try:
            if modules and not any(module.training for module in modules):
                return self._infer_rows(inputs, bad)  # every module called is in eval mode
            with eval_mode(rnet.net):
                return self._infer_rows(inputs, bad)
        except RuntimeError as exc:  # e.g. integer inputs to a floating network
            explain_forward_error(exc, inputs, rnet, name="inputs")
            raise

    def _infer_rows(self, inputs: Tensor, bad: Tensor | None) -> tuple[Tensor, Tensor]:
        grad = torch.enable_grad() if self._inference_needs_grad else torch.no_grad()
        if bad is None:
            with grad:
                return self._process(inputs)
        with torch.no_grad():
            out_bad = self.rnet(take_rows(inputs, bad), dont_record=True)
        good = None
        if not bool(bad.all()):
            with grad:
                good = self._process(take_rows(inputs, ~bad))
        return merge_rows(bad, out_bad, good, self._nan_conformity)

    def _nan_conformity(self, out: Tensor) -> Tensor:
        """The conformity of samples that got none (non-finite inputs): NaN, one per sample
        (classification scores: one per class)."""
        dtype = out.dtype if out.is_floating_point() else torch.get_default_dtype()
        return torch.full((len(out),), math.nan, dtype=dtype, device=out.device)

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
            activations = (torch.cat([a.reshape(a.shape[0], -1) for a in activations], dim=1),)
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


def _is_placeholder(rnet: object) -> bool:
    """Whether ``rnet`` is neither a Recorder nor a network (e.g. ``...``): scores written
    against the reference contract accept it, as the reference does. (A Recorder is an
    ``nn.Module``: one ``isinstance`` on every call.)"""
    return not isinstance(rnet, torch.nn.Module)
