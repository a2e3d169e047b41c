"""FeatureSqueezing: prediction change under input squeezing."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration, ParamError
from scio.scores.core.input_grad import check_max_batch, row_chunks
from scio.scores.utils import get_aggregator
from scio.utils.enums import AggrNameLike

__all__ = ["FeatureSqueezing", "SqueezerLike", "bits_squeeze", "median_squeeze"]

#: A squeezer: ``"bits:<n>"``, ``"median:<size>"`` or a callable ``Tensor -> Tensor``.
SqueezerLike: TypeAlias = str | Callable[[Tensor], Tensor]

_MEDIAN_AXES = {1: (1,), 2: (1, 2), 3: (2, 3)}
#: Input elements squeezed and run through the network at once by default (``max_batch=None``).
_MAX_SQUEEZED_ELEMENTS = 2**22


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def bits_squeeze(x: Tensor, n_bits: int) -> Tensor:
    """Colour-depth reduction ``(round(x * 2**n) + 0.5) / 2**n`` (as in the reference).

    Computed in float32 for half precision (``x * 2**n`` would overflow), cast back.

    Raises:
        ValueError: unless ``0 < n_bits < 32``.
    """
    if not 0 < n_bits < 32:
        msg = f"Bits squeezing requires 0<n_bits<32 (got {n_bits!r})"
        raise ValueError(msg)
    scale = float(2**n_bits)
    work = x.to(_work_dtype(x.dtype))
    return ((torch.round(work * scale) + 0.5) / scale).to(x.dtype)


def _reflect_indices(size: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices of an axis of length ``size`` padded in scipy/numpy ``reflect``/``symmetric``
    mode (``d c b a | a b c d | d c b a``, repeated for pads longer than the axis)."""
    positions = torch.arange(-before, size + after, device=device).remainder(2 * size)
    return torch.where(positions >= size, 2 * size - 1 - positions, positions)


def median_squeeze(x: Tensor, size: int) -> Tensor:
    """Moving median over the spatial axes of each sample, window ``size`` per axis.

    Samples (``x[i]``) of rank 1 or 2 are filtered along all their axes, rank-3 samples
    (channel first) along their last two axes, each channel separately. Borders are
    ``reflect`` padded (half-sample symmetric) and even windows average their two middle
    values, exactly like ``scipy.ndimage.vectorized_filter(x, np.median, size=size,
    axes=...)`` (window ``[i - size // 2, i + (size - 1) // 2]``). Runs in torch on the
    input's device; result in the input dtype.

    Raises:
        ValueError: ``size < 1``, or samples are not 1D, 2D or 3D.
    """
    if size < 1:
        msg = f"Median squeezing requires a positive size (got {size!r})"
        raise ValueError(msg)
    sample_rank = x.ndim - 1
    if sample_rank not in _MEDIAN_AXES:
        msg = f"Individual samples must be 1D, 2D or 3D (got {sample_rank}D)"
        raise ValueError(msg)
    axes = _MEDIAN_AXES[sample_rank]
    windows = x
    for axis in axes:
        indices = _reflect_indices(x.shape[axis], size // 2, (size - 1) // 2, x.device)
        windows = windows.index_select(axis, indices)
    for axis in axes:
        windows = windows.unfold(axis, size, 1)  # window appended as a last dimension
    windows = windows.flatten(-len(axes))
    count = windows.shape[-1]
    if count % 2:
        return windows.median(dim=-1).values
    ordered = windows.sort(dim=-1).values
    middle = ordered[..., count // 2 - 1 : count // 2 + 1].to(_work_dtype(x.dtype))
    return middle.mean(dim=-1).to(x.dtype)


def _parse_squeezer(squeezer: object) -> Callable[[Tensor], Tensor]:
    if isinstance(squeezer, str):
        makers: tuple[tuple[str, str, Callable[..., Tensor]], ...] = (
            ("bits:", "n_bits", bits_squeeze),
            ("median:", "size", median_squeeze),
        )
        for prefix, keyword, func in makers:
            if squeezer.startswith(prefix):
                try:
                    value = int(squeezer[len(prefix) :].strip())
                except ValueError:
                    break
                return functools.partial(func, **{keyword: value})
        msg = f"Squeezer {squeezer!r} is not supported"
        raise ValueError(msg)
    if not callable(squeezer):
        msg = f"Custom squeezers must be callable (got {squeezer!r})"
        raise TypeError(msg)
    return squeezer


def parse_squeezers(
    squeezers: SqueezerLike | Iterable[SqueezerLike],
) -> tuple[Callable[[Tensor], Tensor], ...]:
    """Squeezing functions of a ``squeezers`` parameter.

    A string, a callable or any non-iterable is a single squeezer; otherwise each element is
    one (so a callable container such as ``nn.Sequential`` is one squeezer). Strings are
    ``"bits:<int>"`` or ``"median:<int>"`` (whitespace around the integer is ignored; a part
    that is not an integer makes the string unsupported); the integer's range is validated
    when the squeezer is applied.

    Raises:
        TypeError: a custom squeezer is not callable.
        ValueError: unsupported string.
    """
    if isinstance(squeezers, str) or callable(squeezers) or not isinstance(squeezers, Iterable):
        items: list[object] = [squeezers]
    else:
        items = list(squeezers)
    return tuple(_parse_squeezer(squeezer) for squeezer in items)


class FeatureSqueezing(NoCalibration, BaseScoreClassif):
    """Feature squeezing (Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial Examples
    in Deep Neural Networks", NDSS 2018).

    Idea: squeezing the input (fewer colour bits, median smoothing) barely changes the
    prediction on natural in-distribution inputs but changes it a lot on adversarial or
    unusual ones.

    Formula: with ``p = softmax(f(x))`` and ``p_s = softmax(f(s(x)))`` for each squeezer
    ``s``, conformity ``= -aggregation_s(||p - p_s||_{dist_norm})`` (one value per sample,
    shared by every class; the paper uses the L1 distance and the maximum).

    Args:
        squeezers: one or several squeezers (required): ``"bits:<n>"`` →
            :func:`bits_squeeze` (``0 < n < 32``), ``"median:<size>"`` →
            :func:`median_squeeze` (``size >= 1``), or callables ``Tensor -> Tensor``
            applied to row chunks of the input batch (so they must act on each sample
            independently).
        dist_norm: order of the distance between probability vectors (default 1).
        aggregation: how distances of several squeezers are combined: an aggregator name
            (``"max"`` by default, see :func:`scio.scores.utils.get_aggregator`) or a norm
            order.
        max_batch: inputs squeezed and run through the network at once (``None``: as many
            as fit in ``2**22`` input elements, at least one). Changing it keeps the score
            fit; ``repr`` shows it only when set.
        act_norm: unused.
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: nothing at calibration (no forward pass, labels ignored). Inference: ``1 +
    #squeezers`` forwards: the plain one on the caller's batch, the squeezed ones on row
    chunks of at most ``max_batch`` inputs, one squeezer at a time, so at most one chunk's
    squeezed copy and forward are alive, whatever the batch size and number of squeezers.
    The median squeezer materialises ``size**k`` values per input element of the chunk
    (``k`` filtered axes) for the median selection.
    """

    # validated at ``fit`` (as the reference: a custom squeezer that is not callable raises
    # a TypeError there), hence ``Any`` in the annotation, which the constructor leaves alone
    squeezers: SqueezerLike | Iterable[SqueezerLike] | Any
    dist_norm: float = 1.0
    aggregation: AggrNameLike | float = "max"
    max_batch: int | None = None

    _extension_params = BaseScoreClassif._extension_params | {"max_batch"}
    _keeps_fit = frozenset({"max_batch"})  # a memory bound only

    @property
    def squeezers_fn(self) -> tuple[Callable[[Tensor], Tensor], ...]:
        """The squeezing functions (parsed from ``squeezers`` at ``fit``)."""
        cached = self.__dict__.get("_squeezers_fn")
        return cached if cached is not None else parse_squeezers(self.squeezers)

    def _on_param_will_be_set(self, attr: str, future_val: Any) -> None:
        if attr == "squeezers":
            self.__dict__.pop("_squeezers_fn", None)
        super()._on_param_will_be_set(attr, future_val)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        fns = parse_squeezers(self.squeezers)
        if not fns:
            msg = (
                "Parameter `squeezers` of FeatureSqueezing must name at least one squeezer "
                f"(got {self.squeezers!r})"
            )
            raise ParamError(msg)
        get_aggregator(self.aggregation)  # invalid names raise ValueError now
        check_max_batch(self.max_batch)
        self._squeezers_fn = fns

    @property
    def _acts_on_inputs(self) -> bool:
        return True

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs, dont_record=True)
        work = _work_dtype(out.dtype)
        squeezers = self.squeezers_fn
        per_pass = self.max_batch
        if per_pass is None:
            numel = max(1, inputs[0].numel()) if len(inputs) else 1
            per_pass = max(1, _MAX_SQUEEZED_ELEMENTS // numel)
        distances = out.new_empty((len(inputs), len(squeezers)), dtype=work)
        probs: Tensor | None = None  # after the first squeeze: its input checks come first
        for rows in row_chunks(len(inputs), per_pass):
            chunk = inputs[rows]
            for j, squeeze in enumerate(squeezers):
                squeezed = self.rnet(squeeze(chunk), dont_record=True)
                if probs is None:
                    probs = torch.softmax(out, dim=1, dtype=work)
                diff = probs[rows] - torch.softmax(squeezed, dim=1, dtype=work)
                distances[rows, j] = torch.linalg.vector_norm(diff, ord=self.dist_norm, dim=1)
        aggregated = get_aggregator(self.aggregation)(distances, dim=1)
        return out, (-aggregated).to(out.dtype)
