"""Input checks and the no-side-effect guard shared by every score.

The error contract of every score (``docs/errors.md``) is kept here: clear exceptions for
inputs of another type, shape, dtype or device, for hyper-parameters out of range
(:class:`ParamError`, :class:`ParamRange`), and the per-sample handling of non-finite
inputs (:func:`nonfinite_rows`, :func:`merge_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from scio.recorder.io import batch_size, batch_tensors
from scio.recorder.modes import eval_mode

__all__ = [
    "COMMON_PARAM_RANGES",
    "InputDeviceError",
    "InputDtypeError",
    "ParamError",
    "ParamRange",
    "check_act_norm",
    "check_device",
    "check_dtype",
    "check_input_dtype",
    "check_inputs",
    "check_param_range",
    "check_recorder",
    "check_tensor_inputs",
    "eval_mode",
    "merge_rows",
    "nonfinite_rows",
    "param_ranges",
    "range_of",
]


class ParamError(AssertionError, ValueError):
    """An invalid hyper-parameter (an ``AssertionError`` as in the reference, and a
    ``ValueError`` with a message naming it, its value and the valid range)."""


class InputDtypeError(TypeError, RuntimeError):
    """Inputs of another dtype than the calibration's or the network's (a ``TypeError``,
    and a ``RuntimeError`` as torch raises for this mismatch)."""


class InputDeviceError(TypeError, ValueError):
    """Inputs on another device than the network (a ``TypeError``, and a ``ValueError``
    as scio raised before the error contract)."""


class ParamRange:
    """The valid values of one hyper-parameter, checked at construction, at every
    assignment (``set_params`` included) and again at ``fit``.

    Args:
        test: ``test(value)`` is true for a valid value (an exception counts as false).
        valid: the valid range in words, used in messages (e.g. ``"> 0"``).
    """

    __slots__ = ("test", "valid")

    def __init__(self, test: Callable[[Any], object], valid: str) -> None:
        self.test = test
        self.valid = valid

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is valid."""
        try:
            return bool(self.test(value))
        except Exception:
            return False

    @classmethod
    def interval(
        cls,
        low: float | None = None,
        high: float | None = None,
        *,
        low_open: bool = True,
        high_open: bool = True,
        integer: bool = False,
        optional: bool = False,
        closed: str | None = None,
    ) -> ParamRange:
        """Numbers between ``low`` and ``high`` (``None``: unbounded on that side, infinity
        included; an infinite bound excludes infinity when open). NaN is never valid;
        ``integer``: integers only; ``optional``: ``None`` is valid too. ``closed``
        (``"neither"``, ``"left"``, ``"right"`` or ``"both"``) may replace ``low_open`` and
        ``high_open``."""
        if closed is not None:
            if closed not in ("neither", "left", "right", "both"):
                msg = f"`closed` must be 'neither', 'left', 'right' or 'both' (got {closed!r})"
                raise ValueError(msg)
            low_open = closed not in ("left", "both")
            high_open = closed not in ("right", "both")

        def test(value: Any) -> bool:
            if value is None:
                return optional
            if isinstance(value, bool) or (integer and value != int(value)):
                return False
            if math.isnan(value):
                return False
            above = low is None or (value > low if low_open else value >= low)
            below = high is None or (value < high if high_open else value <= high)
            return bool(above and below)

        if high is None and low is not None:
            valid = f"{'>' if low_open else '>='} {low:g}"
        elif low is None and high is not None:
            valid = f"{'<' if high_open else '<='} {high:g}"
        elif low is None or high is None:
            valid = "not NaN"
        else:
            valid = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        kind = "an integer" if integer else "a number"
        return cls(test, f"{kind} {valid}" + (" (or None)" if optional else ""))


def param_ranges(**ranges: ParamRange) -> Mapping[str, ParamRange]:
    """A score's ``_param_ranges`` (read-only): ``param_ranges(temperature=...)``."""
    return MappingProxyType(ranges)


#: Ranges of the parameters shared by many scores (checked wherever a score declares one).
#: ``act_norm`` is not among them: it is checked at ``fit`` only (:func:`check_act_norm`).
COMMON_PARAM_RANGES = param_ranges(
    k=ParamRange.interval(0, integer=True),
    bank_fraction=ParamRange.interval(0, 1, high_open=False),
    max_batch=ParamRange.interval(1, low_open=False, integer=True, optional=True),
)


def range_of(cls: Any, name: str) -> ParamRange | None:
    """The valid range of parameter ``name`` of the score class ``cls``: its
    ``_param_ranges`` merged along the MRO (cached on the class); ``None``: not checked."""
    ranges = cls.__dict__.get("_merged_ranges")
    if ranges is None:
        ranges = {}
        for klass in reversed(cls.__mro__):
            ranges.update(klass.__dict__.get("_param_ranges", {}))
        cls._merged_ranges = ranges
    return ranges.get(name) if name in cls._param_names else None


def check_param_range(owner: object, name: str, value: Any, valid: ParamRange | None) -> None:
    """Raise :class:`ParamError` naming ``name``, ``value`` and the range unless ``value``
    is in ``valid`` (``None``: any value)."""
    if valid is None or valid.accepts(value):
        return
    msg = f"Parameter `{name}` of {type(owner).__name__} must be {valid.valid} (got {value!r})"
    raise ParamError(msg)


def _require(condition: object) -> None:
    """Raise a :class:`ParamError` with an empty message unless ``condition`` holds."""
    if not condition:
        raise ParamError


def check_act_norm(value: Any) -> None:
    """Check ``act_norm`` at ``fit`` (it is accepted when set): ``None`` or a non-zero
    number, not NaN.

    The one exception to the error contract (``docs/errors.md``), for compatibility: as in
    the reference, whose tests pin it, a bad value is accepted when set and ``fit`` raises a
    :class:`ParamError` (an ``AssertionError``) with an empty message; the traceback shows
    the failed line below, which says why.
    """
    if value is None:
        return
    _require(value != 0)  # `act_norm` must not be 0 (None, or a non-zero number, not NaN)
    _require(value == value)  # `act_norm` must not be NaN (None, or a non-zero number)


def check_inputs(
    inputs: Any,
    sample_shape: tuple[int, ...] | None,
    *,
    name: str,
    keys: tuple[str, ...] | None = None,
) -> None:
    """Raise a clear error unless ``inputs`` is a non-empty tensor batch, or a dict batch
    (models called as ``net(**batch)``) whose tensors share their batch size.

    Any dtype is accepted, as in the reference (e.g. integer token ids for a network that
    embeds them); :func:`check_dtype` catches a floating dtype the network does not use.

    Args:
        inputs: the batch to check.
        sample_shape: the per-sample shape a tensor batch must have (``None``: any).
        name: the argument name used in messages.
        keys: the keys a dict batch must hold (the recorder's ``input_data`` keys).
    """
    if isinstance(inputs, Mapping):
        if keys is not None:
            missing = [key for key in keys if key not in inputs]
            if missing:
                msg = (
                    f"`{name}` lacks the key(s) {missing}: the recorder was built on a batch "
                    f"with keys {list(keys)} (got keys {list(inputs)})"
                )
                raise ValueError(msg)
        if batch_size(inputs, name=name) == 0:
            msg = f"`{name}` must hold at least one sample (got an empty dict batch)"
            raise ValueError(msg)
        return
    if not isinstance(inputs, Tensor):
        msg = f"`{name}` must be a torch.Tensor or a dict of tensors (got {type(inputs).__name__})"
        raise TypeError(msg)
    if inputs.ndim == 0 or len(inputs) == 0:
        msg = f"`{name}` must hold at least one sample (got shape {tuple(inputs.shape)})"
        raise ValueError(msg)
    if sample_shape is not None and tuple(inputs.shape[1:]) != tuple(sample_shape):
        msg = (
            f"`{name}` samples must have shape {tuple(sample_shape)} like the calibration "
            f"data (got {tuple(inputs.shape[1:])})"
        )
        raise ValueError(msg)


def check_tensor_inputs(inputs: Any, score_name: str, *, name: str = "inputs") -> None:
    """Raise ``TypeError`` for a dict batch given to a score that works in input space
    (perturbations, input gradients, squeezing: it needs one tensor to act on)."""
    if not isinstance(inputs, Mapping):
        return
    msg = (
        f"{score_name} acts on the network's input itself (perturbation, input gradient or "
        f"squeezing), so `{name}` must be one tensor, or a dict holding only the tensor the "
        f"recorder was built with (e.g. {{'pixel_values': x}}); got a dict batch with keys "
        f"{list(inputs)}: score such a model with a feature or logit score"
    )
    raise TypeError(msg)


def check_device(inputs: Any, net: nn.Module, *, name: str) -> None:
    """Raise :class:`InputDeviceError` (a ``TypeError`` and a ``ValueError``) naming both
    devices if ``inputs`` (a tensor or each tensor of a dict batch) is not on the device of
    ``net``'s parameters."""
    for param in net.parameters():
        for key, tensor in batch_tensors(inputs).items():
            if param.device != tensor.device:
                what = f"{name}[{key!r}]" if key else name
                msg = (
                    f"`{what}` is on {tensor.device} but the network is on {param.device}; "
                    f"move one of them (e.g. `{what}.to({str(param.device)!r})`)"
                )
                raise InputDeviceError(msg)
        return


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_dtype(inputs: Tensor, net: nn.Module, *, name: str) -> None:
    """Raise :class:`InputDtypeError` (a ``TypeError`` and a ``RuntimeError``, torch's
    error type for this mismatch) if floating ``inputs`` do not have the floating dtype of
    ``net``'s first floating parameter."""
    if not inputs.is_floating_point():
        return
    for param in net.parameters():
        if not param.is_floating_point():
            continue
        if param.dtype != inputs.dtype:
            kind = _dtype_name(param.dtype)
            msg = (
                f"`{name}` is {_dtype_name(inputs.dtype)} but the network "
                f"computes in {kind}: convert the inputs with `{name}.to(torch.{kind})` (or "
                f"the network with `net.to({inputs.dtype!s})`)"
            )
            raise InputDtypeError(msg)
        return


def check_input_dtype(
    inputs: Tensor, calib_dtype: torch.dtype | None, first_param: Tensor | None, *, name: str
) -> None:
    """Raise :class:`InputDtypeError` naming both dtypes unless ``inputs`` have the dtype
    of the calibration data (``None``: unknown, not checked) and, when floating, the dtype
    the network computes in (``first_param``: its first parameter). Inputs are never cast:
    a float64 batch for a float32 score is refused, not silently rounded."""
    if calib_dtype is not None and inputs.dtype != calib_dtype:
        kind = _dtype_name(calib_dtype)
        msg = (
            f"`{name}` is {_dtype_name(inputs.dtype)} but the score was calibrated on {kind} "
            f"inputs: convert them with `{name}.to(torch.{kind})` (for a network cast since "
            "`fit`: fit again, or `scio.load_score` the saved score on the cast network)"
        )
        raise InputDtypeError(msg)
    if (
        first_param is not None
        and inputs.is_floating_point()
        and first_param.is_floating_point()
        and first_param.dtype != inputs.dtype
    ):
        kind = _dtype_name(first_param.dtype)
        msg = (
            f"`{name}` is {_dtype_name(inputs.dtype)} but the network computes in {kind} "
            "(it was cast after `fit`): fit the score again, or `scio.load_score` the saved "
            "score on the cast network"
        )
        raise InputDtypeError(msg)


def check_recorder(rnet: Any, score_name: str) -> None:
    """One sentence saying what to do when ``rnet`` is not a :class:`Recorder`."""
    from scio.recorder import Recorder

    if isinstance(rnet, Recorder):
        return
    plain = isinstance(rnet, torch.nn.Module)
    what = f"a plain nn.Module, {type(rnet).__name__}" if plain else type(rnet).__name__
    msg = (
        f"`rnet` must be a scio Recorder (got {what}): wrap your network with "
        f"`rnet = Recorder(net, input_data=calib_data[:1])`, record the layers "
        f"{score_name} uses with `rnet.record(...)`, then call `fit(rnet, ...)`"
    )
    raise TypeError(msg)


# -- non-finite inputs, per sample ------------------------------------------------------------
def nonfinite_rows(inputs: Any) -> Tensor | None:
    """The boolean mask of the samples of ``inputs`` (a tensor or dict batch) holding a NaN
    or an infinite value, or ``None`` when every sample is finite (or no tensor's dtype can
    hold non-finite values). One ``isfinite`` reduction per floating tensor: the whole cost
    of the check on a finite batch."""
    if isinstance(inputs, Tensor):
        return _nonfinite_tensor(inputs)
    if not isinstance(inputs, Mapping):
        return None
    bad: Tensor | None = None
    for tensor in batch_tensors(inputs).values():
        rows = _nonfinite_tensor(tensor)
        if rows is not None:
            bad = rows if bad is None else bad | rows
    return bad


def _nonfinite_tensor(inputs: Tensor) -> Tensor | None:
    if not (inputs.is_floating_point() or inputs.is_complex()) or inputs.ndim == 0:
        return None
    if inputs.is_meta:  # no values (refused by the device check)
        return None
    # fast path: one reduction is finite iff every value is (or a finite sum overflows: then
    # the exact check below decides); torch.isfinite costs several kernels
    if inputs.is_floating_point() and math.isfinite(inputs.sum().item()):
        return None
    finite = torch.isfinite(inputs.reshape(len(inputs), -1)).all(dim=1)
    if bool(finite.all()):
        return None
    return ~finite


def merge_rows(
    bad: Tensor,
    out_bad: Tensor,
    good: tuple[Tensor, Tensor] | None,
    nan_conformity: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """``(out, conformity)`` of a whole batch from its finite and its non-finite rows.

    Args:
        bad: mask of the non-finite rows (see :func:`nonfinite_rows`).
        out_bad: the network output of the non-finite rows alone.
        good: ``(out, conformity)`` computed on the finite rows alone (``None``: none).
        nan_conformity: the all-NaN conformity of a batch given its network output (used
            when no row is finite, for the score's conformity shape and dtype).

    Returns:
        ``out`` with every row from its own forward, and ``conformity`` with the values of
        the finite rows and NaN for the others.
    """
    if good is None:
        return out_bad, nan_conformity(out_bad)
    out_good, conf_good = good
    if not (conf_good.is_floating_point() or conf_good.is_complex()):
        conf_good = conf_good.to(torch.get_default_dtype())  # NaN needs a floating dtype
    n = len(bad)
    out = out_good.new_empty((n, *out_good.shape[1:]))
    out[~bad] = out_good
    out[bad] = out_bad.to(out.dtype)
    conformity = conf_good.new_full((n, *conf_good.shape[1:]), math.nan)
    conformity[~bad] = conf_good
    return out, conformity
