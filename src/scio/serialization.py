"""Save a fitted score to a file and load it next to a network, elsewhere.

The file is a ``torch.save`` archive holding only tensors and plain Python values (no
pickled classes or code), read back with ``torch.load(weights_only=True)``: loading a file
crafted to run code fails instead of executing it. It stores a format version, the score's
class name, its hyper-parameters, the recorded layers with their per-sample output shapes,
the calibration input shape, and the fitted state.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import pickle
import uuid
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from scio.index import Index
from scio.index.bank import ResidualBank
from scio.recorder import Recorder

#: A scio score. Serialization knows scores only through the registry below and the
#: attributes a score file stores (``params``, ``_fitted_attrs``, the fitted values), so it is
#: typed structurally here and never imports the scores it serializes.
BaseScore = Any

__all__ = [
    "FORMAT_VERSION",
    "ScoreFileError",
    "check_payload",
    "load_score",
    "save_score",
    "score_from_payload",
    "score_payload",
]

FORMAT_VERSION = 1
_MAGIC = "scio-score"
_INDEX_TAG = "__scio_index__"
_TUPLE_TAG = "__scio_tuple__"
_FLOAT_TAG = "__scio_float__"
_BANK_TAG = "__scio_bank__"

PathLike = str | os.PathLike[str]


class ScoreFileError(ValueError):
    """A score file is unreadable, of another format version, or does not fit the network."""


# -- encoding of values --------------------------------------------------------------------
def _encode(value: Any) -> Any:
    """Turn a parameter or fitted value into tensors and plain containers."""
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, Index):
        stored = value.stored
        head = {_INDEX_TAG: True, "dim": value.dim, "metric": str(value.metric)}
        head["options"] = _encode(value.options)  # backend: approximate indexes are rebuilt
        if isinstance(stored, ResidualBank):  # a coded half-precision bank stays coded
            return {**head, "bank": _encode(stored)}
        return {**head, "samples": stored.detach().cpu().clone()}
    if isinstance(value, ResidualBank):
        return {
            _BANK_TAG: True,
            "codebook": value.codebook.detach().cpu().clone(),
            "codes": value.codes.detach().cpu().clone(),
            "residuals": value.residuals.detach().cpu().clone(),
        }
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT_TAG: repr(value)}  # inf/nan survive any round trip
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    msg = f"Cannot save a value of type {type(value).__name__} ({value!r:.80})"
    raise TypeError(msg)


class _Target:
    """Where decoded tensors go: a device, and a map of floating dtypes."""

    def __init__(self, device: torch.device, saved: torch.dtype, dtype: torch.dtype) -> None:
        self.device = device
        self.saved = saved
        self.dtype = dtype

    def __call__(self, tensor: Tensor) -> Tensor:
        # Tensors in the network's dtype at save time follow the new network's dtype;
        # others (e.g. float64 statistics of a float32 network) keep their dtype.
        if tensor.is_floating_point() and tensor.dtype == self.saved:
            return tensor.to(device=self.device, dtype=self.dtype)
        return tensor.to(device=self.device)


def _rebuilt_index(value: Mapping[str, Any]) -> Index:
    """An empty index with the saved dimension, metric and options (files written before
    options were saved: the exact torch index). A faiss backend that cannot be imported
    here falls back to the exact torch index, with a warning."""
    options = dict(value.get("options") or {})
    dim, metric = int(value["dim"]), value["metric"]
    try:
        return Index(dim=dim, metric=metric, **options)
    except ImportError:
        warnings.warn(
            f"The saved index used the {options.get('backend')!r} backend, but faiss cannot be "
            "imported here: loading it as the exact torch index (`pip install scio[faiss]` "
            "to keep the saved backend)",
            UserWarning,
            stacklevel=3,
        )
        return Index(dim=dim, metric=metric)


def _decode(value: Any, target: _Target) -> Any:
    """Inverse of :func:`_encode`, moving tensors as ``target`` says."""
    if isinstance(value, Tensor):
        return target(value)
    if isinstance(value, dict):
        if value.get(_INDEX_TAG) is True:
            index = _rebuilt_index(value)
            samples = (
                _decode(value["bank"], target) if "bank" in value else target(value["samples"])
            )
            if len(samples):
                index.add(samples)
            return index
        if value.get(_BANK_TAG) is True:  # dtypes kept: the codebook is the precise part
            return ResidualBank(
                *(value[name].to(target.device) for name in ("codebook", "codes", "residuals"))
            )
        if _TUPLE_TAG in value:
            return tuple(_decode(v, target) for v in value[_TUPLE_TAG])
        if _FLOAT_TAG in value:
            return float(value[_FLOAT_TAG])
        return {k: _decode(v, target) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, target) for v in value]
    return value


# -- save ----------------------------------------------------------------------------------
def _layer_shapes(rnet: Recorder, input_shape: tuple[int, ...], dtype: torch.dtype) -> list[Any]:
    """Per-sample output shapes of the recorded layers for a dummy input."""
    device = _net_device(rnet.net)
    dummy = torch.zeros((1, *input_shape), dtype=dtype, device=device)
    try:
        with torch.no_grad():
            rnet(dummy)
    except Exception as exc:
        msg = (
            f"The network cannot process inputs of the calibration sample shape {input_shape} "
            f"saved with the score ({type(exc).__name__}: {exc})"
        )
        raise ScoreFileError(msg) from exc
    shapes = [
        list(act.shape[1:]) if isinstance(act, Tensor) else None
        for act in rnet.activations.values()
    ]
    rnet(dummy, dont_record=True)  # leave no reference to the dummy activations
    return shapes


def save_score(score: BaseScore, path: PathLike) -> None:
    """Write a fitted ``score`` to ``path`` (see :func:`load_score`).

    The file is written to a temporary file in the same folder, then renamed over ``path``
    (``os.replace``, atomic on POSIX and Windows): a failure or an interruption mid-write
    never leaves a damaged file at ``path``, and an existing file there stays intact.
    """
    payload = score_payload(score)
    target = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(target))
    # a fresh name next to the target (same file system, so the rename is atomic); opened
    # like any new file, so it gets the usual permissions (umask), unlike ``mkstemp``'s 0600
    temporary = os.path.join(folder, f".{base}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def score_payload(score: BaseScore) -> dict[str, Any]:
    """The safe content of a score file (tensors and plain values), e.g. to embed it."""
    if not score.is_fit:
        msg = f"Only a fitted score can be saved; {type(score).__name__} is not fit"
        raise RuntimeError(msg)
    rnet = score.rnet
    input_shape = tuple(score.__dict__.get("_fit_input_shape", ()))
    input_dtype = score.__dict__.get("_fit_input_dtype") or _net_dtype(rnet.net)
    payload = {
        "magic": _MAGIC,
        "format_version": FORMAT_VERSION,
        "class": type(score).__name__,
        "params": _encode(score.params),
        "layers": [list(layer) for layer in rnet.recording],
        "layer_shapes": _layer_shapes(rnet, input_shape, input_dtype),
        "input_shape": list(input_shape),
        "input_dtype": str(input_dtype).removeprefix("torch."),
        "n_samples": int(score.__dict__.get("_fit_n_samples", 0)),
        "net_dtype": str(_net_dtype(rnet.net)).removeprefix("torch."),
        "fitted": {name: _encode(getattr(score, name)) for name in score._fitted_attrs},
    }
    return payload


# -- load ----------------------------------------------------------------------------------
def _net_device(net: nn.Module) -> torch.device:
    for param in net.parameters():
        return param.device
    for buffer in net.buffers():
        return buffer.device
    return torch.device("cpu")


def _dtype(name: object, default: torch.dtype) -> torch.dtype:
    """The torch dtype called ``name`` (``default`` for anything else)."""
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else default


def _net_dtype(net: nn.Module) -> torch.dtype:
    for tensor in net.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


#: Score classes by name, filled by :func:`register_score` (every ``BaseScore`` subclass
#: registers itself when it is defined). Serialization knows the scores only through it.
_REGISTRY: dict[str, Any] = {}
#: Packages whose import registers the built-in scores, imported on the first load (plugin
#: style, so that this module never imports the scores it serializes).
_PROVIDERS = ("scio.scores",)


def register_score(cls: Any) -> None:
    """Make ``cls`` loadable by name (called by ``BaseScore.__init_subclass__``); a class
    defined later under the same name replaces the earlier one."""
    _REGISTRY[cls.__name__] = cls


def _score_classes() -> dict[str, Any]:
    for provider in _PROVIDERS:
        importlib.import_module(provider)
    return dict(_REGISTRY)


def _read(path: PathLike) -> dict[str, Any]:
    """The checked payload of the score file at ``path``. A missing or unreadable path raises
    its ``OSError``; anything that is not a valid score file raises :class:`ScoreFileError`
    with the reason."""
    source = os.fspath(path)
    with open(source, "rb") as file:  # OSError (missing file, folder, permissions) as is
        head = file.read(4)
    if not head:
        msg = f"{source!r} is not a scio score file: it is empty (0 bytes)"
        raise ScoreFileError(msg)
    if not zipfile.is_zipfile(source):
        kind = "truncated" if head.startswith(b"PK") else "of another format"
        msg = (
            f"{source!r} is not a scio score file: it is not a torch.save archive "
            f"({kind}; score files are zip archives written by `score.save`)"
        )
        raise ScoreFileError(msg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's pickle-protocol notice
            payload = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = (
            f"{source!r} is not a safe scio score file: it contains objects other "
            "than tensors and plain values, and was not loaded"
        )
        raise ScoreFileError(msg) from exc
    except Exception as exc:  # damaged or foreign archives fail in many ways inside torch
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        msg = f"{source!r} is not a readable scio score file ({type(exc).__name__}: {reason})"
        raise ScoreFileError(msg) from exc
    return check_payload(payload, source)


def check_payload(payload: Any, source: str) -> dict[str, Any]:
    """Raise :class:`ScoreFileError` unless ``payload`` is a score of this format version."""
    if not isinstance(payload, dict) or payload.get("magic") != _MAGIC:
        msg = f"{source!r} is not a scio score file"
        raise ScoreFileError(msg)
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        msg = (
            f"{source!r} uses scio score format version {version!r}; this scio "
            f"reads version {FORMAT_VERSION}"
        )
        raise ScoreFileError(msg)
    for key, kind in _PAYLOAD_TYPES.items():
        if not isinstance(payload.get(key), kind):
            got = type(payload[key]).__name__ if key in payload else "nothing"
            msg = f"{source!r} is a damaged scio score file: `{key}` is {got}"
            raise ScoreFileError(msg)
    return payload


#: The entries every score file holds, with their types (checked before any is used).
_PAYLOAD_TYPES: dict[str, type | tuple[type, ...]] = {
    "class": str,
    "params": dict,
    "layers": list,
    "layer_shapes": list,
    "input_shape": list,
    "fitted": dict,
}


def load_score(
    path: PathLike,
    net: nn.Module,
    *,
    expected: Any = None,
    classes: Iterable[Any] = (),
    **recorder_kwargs: Any,
) -> BaseScore:
    """Load a score saved with ``score.save(path)`` and bind it to ``net``.

    A fresh :class:`~scio.recorder.Recorder` on ``net`` records the same layers; the fitted
    state moves to the device and floating dtype of ``net``.

    Args:
        path: the score file.
        net: the network to bind the score to (same architecture as at fit time).
        expected: if given, the file must hold a score of exactly this class.
        classes: extra (user-defined) score classes the file may name; built-in scores are
            always known. No other class is ever imported.
        **recorder_kwargs: passed to the new recorder (default: a zero input of the saved
            calibration shape).

    Raises:
        ScoreFileError: unsafe or unreadable file, other format version, other algorithm
            than ``expected``, or recorded layers whose shapes differ on ``net``.
    """
    return score_from_payload(
        _read(path), net, os.fspath(path), expected=expected, classes=classes, **recorder_kwargs
    )


def score_from_payload(
    payload: dict[str, Any],
    net: nn.Module,
    source: str,
    *,
    expected: Any = None,
    classes: Iterable[Any] = (),
    **recorder_kwargs: Any,
) -> BaseScore:
    """:func:`load_score` from a checked payload (``source`` names it in errors)."""
    known = _score_classes()
    known.update({cls.__name__: cls for cls in classes})
    name = payload["class"]
    if expected is not None and name != expected.__name__:
        msg = f"{source!r} holds a {name} score, not a {expected.__name__}"
        raise ScoreFileError(msg)
    if name not in known:
        msg = (
            f"{source!r} holds a score of unknown class {name!r}; pass it with "
            "`classes=[...]` if it is your own"
        )
        raise ScoreFileError(msg)
    cls = known[name]
    device, dtype = _net_device(net), _net_dtype(net)
    try:
        input_shape = tuple(int(s) for s in payload["input_shape"])
        layers = [(int(depth), int(idx)) for depth, idx in payload["layers"]]
    except (TypeError, ValueError) as exc:
        msg = f"{source!r} is a damaged scio score file: bad input shape or layers ({exc})"
        raise ScoreFileError(msg) from exc
    if "input_data" not in recorder_kwargs and "input_size" not in recorder_kwargs:
        recorder_kwargs["input_data"] = torch.zeros((1, *input_shape), dtype=dtype, device=device)
    rnet = Recorder(net, **recorder_kwargs)
    try:
        rnet.record(*layers)
    except ValueError as exc:
        msg = f"The network has no layers {layers} recorded by the saved score ({exc})"
        raise ScoreFileError(msg) from exc
    shapes = _layer_shapes(rnet, input_shape, dtype)
    if shapes != payload["layer_shapes"]:
        msg = (
            f"Recorded layers {layers} have per-sample shapes {shapes} on this network, but "
            f"{payload['layer_shapes']} in the saved score"
        )
        raise ScoreFileError(msg)
    saved_dtype = _dtype(payload.get("net_dtype"), torch.float32)
    target = _Target(device, saved_dtype, dtype)
    try:
        score = cls(**_decode(payload["params"], target))
        n_samples = int(payload.get("n_samples", 0))
        if n_samples:
            score._check_params(n_samples)  # validates and normalises parameters as fit does
        for attr, value in payload["fitted"].items():
            setattr(score, attr, _decode(value, target))
    except ScoreFileError:
        raise
    except Exception as exc:  # a forged or damaged file: invalid parameters or state
        msg = (
            f"{source!r} is a damaged scio score file: its {name} parameters or fitted state "
            f"cannot be restored ({type(exc).__name__}: {exc})"
        )
        raise ScoreFileError(msg) from exc
    # floating inputs follow the network's dtype, as the fitted state does; others (e.g.
    # token ids) keep the calibration's
    input_dtype = _dtype(payload.get("input_dtype"), saved_dtype)
    score._rnet = rnet
    score._fit_input_shape = input_shape
    score._fit_input_dtype = dtype if input_dtype.is_floating_point else input_dtype
    score._fit_n_samples = n_samples
    score._is_fit = True
    return score
