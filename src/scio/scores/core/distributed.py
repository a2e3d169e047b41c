"""Calibration across ``torch.distributed`` ranks: each rank streams its own shard.

``score.fit(rnet, loader, distributed=True)`` (or a process group) runs the usual stream of
batches on every rank, then, before the fitted state is computed, merges the calibration
states of all ranks so that every rank ends with the score a single process would fit on
the **rank-ordered union** of the shards (rank 0's batches, then rank 1's, ...):

1. a collective fingerprint check (one ``all_gather_object``): score class, hyper-parameters,
   recorded layers, input shape, and the names/shapes/dtypes of the calibration state must
   agree on every rank (ranks without samples only contribute the first three). A mismatch
   raises :class:`DistributedMismatchError` on **every** rank, so no rank is left waiting in a
   later collective;
2. running sums (``CalibState.add``) are all-reduced (``SUM``); kept tensors
   (``CalibState.append``) and the inputs/labels buffered by scores written against the
   reference ``calibrate`` contract are all-gathered with uneven sizes (ranks may hold zero
   samples) and concatenated in rank order;
3. the global sample count is what ``_check_params`` sees.

Works with the gloo (CPU tensors) and NCCL (CUDA tensors; each rank's current CUDA device)
backends; tensors travel on the backend's device and come back to the rank's device.

Equality with a single-process fit on the rank-ordered union, per algorithm (tested over
every entry of the test catalogue, 2 gloo processes, uneven shards and an empty rank):

* **bitwise** (only concatenated tensors, order preserved): KNN, LID, DkNN, Trust (also
  with a subsampled bank: the subsample is drawn on the merged bank; and with a float16
  bank while no rank holds more than :data:`~scio.index.bank.TRAIN_ROWS` rows,
  beyond which every rank codes its rows against its own codebook and the merged bank
  equals the single-process one up to float16 rounding, see :mod:`scio.index.bank`),
  IsoMax,
  Gram, JTLA, OpenMax, NNGuide, ReAct (exact path), and every score using the reference
  ``calibrate`` contract (e.g. :class:`~scio.scores.BaselineClassif`); scores with nothing
  to learn (Softmax, Logit, Energy, JointEnergy, ODIN, GradNorm, FeatureSqueezing, Entropy,
  GEN, ASH, SCALE) trivially;
* **within float tolerance** (running sums, whose addition order differs: per-rank partial
  sums, then the all-reduce): DeepMahalanobis, RelativeMahalanobis, ViM (past its kept-
  feature budget, within the subsample's statistical error instead), KLM, DICE, fDBD,
  NCI, SHE, and Odds (only with ``epsilon == 0``: with noise, every rank draws its own noise
  stream, so the fit equals a single-process fit in distribution only, and the generator
  state kept for inference is the rank's own); ReAct's sketch path (its certified rank
  error bound holds for the union).

An exception raised by one rank inside its own stream (e.g. invalid labels, a failing
data loader) is reported to the others in the same fingerprint exchange
(:func:`report_failure`): they raise :class:`DistributedMismatchError` naming that rank and
its error, and the failing rank re-raises its own exception, so no rank waits. A rank that
dies (killed, out of memory) still leaves the others waiting until the process group's
timeout.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from scio.recorder.io import map_tensors
from scio.scores.core.calibration import CalibState
from scio.scores.core.protocol import FittableScore, SessionLike

__all__ = [
    "DistributedMismatchError",
    "example_input",
    "merge_session",
    "report_failure",
    "resolve_group",
]

_log = logging.getLogger(__name__)

#: Private attributes created during calibration that are not copied to empty ranks (the
#: others, plain values and tensors such as a score's class count or a fixed origin, are).
_SKIPPED_ATTRS = frozenset({"_state", "_calib_buffer", "_rnet", "_timer", "_is_fit"})
_SIMPLE = (bool, int, float, str, type(None))

_HOW_TO_INIT = (
    "initialise one first, e.g. `torch.distributed.init_process_group('gloo')` (CPU) or "
    "`init_process_group('nccl')` (GPU) in every process (launch with `torchrun "
    "--nproc-per-node=N script.py`, which sets RANK, WORLD_SIZE, MASTER_ADDR and "
    "MASTER_PORT), or call `fit(..., distributed=False)`"
)


class DistributedMismatchError(ValueError):
    """Ranks disagree on the score configuration or on the recorded shapes."""


def resolve_group(distributed: Any) -> Any:
    """The process group to merge over, or ``None`` for a single-process fit.

    ``distributed`` is ``False`` (single process), ``True`` (the default world group) or a
    ``torch.distributed`` process group.

    Raises:
        RuntimeError: a distributed fit is asked but no process group is initialised.
        TypeError: ``distributed`` is neither a bool nor a process group.
    """
    if distributed is False or distributed is None:
        return None
    if not (distributed is True or isinstance(distributed, dist.ProcessGroup)):
        msg = (
            "`distributed` must be a bool or a torch.distributed ProcessGroup "
            f"(got {type(distributed).__name__})"
        )
        raise TypeError(msg)
    if not (dist.is_available() and dist.is_initialized()):
        msg = (
            f"`distributed={distributed!r}` needs an initialised torch.distributed process group: "
        )
        raise RuntimeError(msg + _HOW_TO_INIT)
    return dist.group.WORLD if distributed is True else distributed


# -- fingerprint ---------------------------------------------------------------------------------
def _simple(value: Any) -> bool:
    if isinstance(value, _SIMPLE):
        return True
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return False


@dataclass
class _Spec:
    """What one rank holds, exchanged before merging (picklable, small)."""

    config: tuple[str, str, tuple[Any, ...]]  # class, params repr, recorded layers
    n_samples: int
    input_shape: tuple[int, ...] | None
    input_dtype: str
    parts: dict[str, tuple[tuple[int, ...], str]]  # name -> (trailing shape, dtype)
    sums: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    buffer: tuple[tuple[int, ...], str, str, str] | None  # inputs shape, dtype; labels kind, dtype
    extras: dict[str, Any]


@dataclass
class _Failure:
    """Sent instead of a :class:`_Spec` by a rank whose calibration stream raised."""

    message: str


def report_failure(group: Any, exc: BaseException) -> None:
    """Tell the other ranks, waiting in :func:`merge_session` or :func:`example_input`, that
    this rank's calibration stream raised ``exc`` (collective: it takes part in their
    exchange). Never raises: the caller re-raises ``exc``, the error that matters."""
    failure = _Failure(f"{type(exc).__name__}: {exc}"[:500])
    specs: list[Any] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(specs, failure, group=group)
    except Exception:
        _log.debug("could not report the failure to the other ranks", exc_info=True)


def _raise_failures(gathered: list[Any]) -> None:
    """Raise on a healthy rank if another one reported a failure (:func:`report_failure`)."""
    failed = [(rank, item) for rank, item in enumerate(gathered) if isinstance(item, _Failure)]
    if failed:
        lines = "\n  ".join(f"rank {rank}: {item.message}" for rank, item in failed)
        msg = (
            "Distributed calibration: the calibration stream failed on another rank (every "
            f"other rank raises this error):\n  {lines}"
        )
        raise DistributedMismatchError(msg)


def _labels_kind(labels: list[Any]) -> str:
    if all(label is None for label in labels):
        return "none"
    if all(isinstance(label, Tensor) for label in labels):
        return "tensor"
    return "object"


def _local_spec(score: FittableScore, session: SessionLike, attrs_before: set[str]) -> _Spec:
    params = ", ".join(f"{name}={value!r}" for name, value in sorted(score.params.items()))
    config = (type(score).__qualname__, params, tuple(score.rnet.recording))
    parts: dict[str, tuple[tuple[int, ...], str]] = {}
    sums: dict[str, tuple[tuple[int, ...], str]] = {}
    state = score.__dict__.get("_state")
    if isinstance(state, CalibState) and session.n_samples:
        for name, values in state._parts.items():
            first = values[0]
            parts[name] = (tuple(first.shape[1:]), str(first.dtype))
        for name, value in state._sums.items():
            sums[name] = (tuple(value.shape), str(value.dtype))
    buffer = None
    items = score.__dict__.get("_calib_buffer")
    if items and session.n_samples:
        inputs = items[0][0]
        labels = [y for _, y in items]
        kind = _labels_kind(labels)
        label_dtype = str(labels[0].dtype) if kind == "tensor" else ""
        buffer = (tuple(inputs.shape[1:]), str(inputs.dtype), kind, label_dtype)
    extras = {
        name: value.detach().cpu() if isinstance(value, Tensor) else value
        for name, value in score.__dict__.items()
        if name.startswith("_")
        and name not in attrs_before
        and name not in _SKIPPED_ATTRS
        and (_simple(value) or isinstance(value, Tensor))
    }
    return _Spec(
        config,
        session.n_samples,
        session.input_shape,
        str(session.input_dtype),
        parts,
        sums,
        buffer,
        extras,
    )


def _check_agreement(specs: list[_Spec]) -> list[int]:
    """Raise the same error on every rank if the specs disagree; return the non-empty ranks."""
    problems = []
    if len({spec.config for spec in specs}) > 1:
        lines = [
            f"rank {r}: {s.config[0]}({s.config[1]}) on {s.config[2]}" for r, s in enumerate(specs)
        ]
        problems.append(
            "score class, hyper-parameters or recorded layers differ:\n  " + "\n  ".join(lines)
        )
    full = [rank for rank, spec in enumerate(specs) if spec.n_samples]
    for field in ("input_shape", "parts", "sums", "buffer"):  # extras may differ (counters)
        values = {rank: getattr(specs[rank], field) for rank in full}
        if len({repr(v) for v in values.values()}) > 1:
            lines = [f"rank {rank}: {value}" for rank, value in values.items()]
            problems.append(f"{field} differ between ranks:\n  " + "\n  ".join(lines))
    if problems:
        msg = (
            "Distributed calibration: ranks do not calibrate the same score on the same "
            "recorded shapes (every rank raises this error):\n" + "\n".join(problems)
        )
        raise DistributedMismatchError(msg)
    return full


# -- collectives ---------------------------------------------------------------------------------
def _comm_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."))
    assert isinstance(dtype, torch.dtype)
    return dtype


_WIRE_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8)


def _as_wire(t: Tensor) -> Tensor:
    """Bit-exact representation of ``t`` that every backend can move (raw bytes for the
    dtypes a backend may lack: bool, half precision, small integers)."""
    if t.dtype in _WIRE_DTYPES:
        return t
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.reshape(len(t), math.prod(t.shape[1:])).view(torch.uint8)


def _from_wire(t: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    if dtype in _WIRE_DTYPES:
        return t
    if dtype == torch.bool:
        return t.to(torch.bool)
    return t.view(dtype).reshape(len(t), *shape)


def _gather_cat(local: Tensor, group: Any, comm: torch.device) -> Tensor:
    """Concatenation, in rank order, of every rank's ``local`` (uneven first dimension)."""
    device, dtype = local.device, local.dtype
    world = dist.get_world_size(group)
    wire = _as_wire(local.contiguous()).to(comm)
    size = torch.tensor([wire.shape[0]], dtype=torch.int64, device=comm)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    largest = max(counts)
    padded = wire.new_zeros((largest, *wire.shape[1:]))
    padded[: wire.shape[0]] = wire
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    merged = torch.cat([g[:count] for g, count in zip(gathered, counts, strict=True)])
    return _from_wire(merged, dtype, tuple(local.shape[1:])).to(device)


def _all_sum(local: Tensor, group: Any, comm: torch.device) -> Tensor:
    device, dtype = local.device, local.dtype
    wire = local.to(
        device=comm, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    )
    wire = wire.clone()
    dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=group)
    return wire.to(device=device, dtype=dtype)


def _local_device(score: FittableScore) -> torch.device:
    param = next(iter(score.rnet.net.parameters()), None)
    return torch.device("cpu") if param is None else param.device


def merge_session(
    group: Any, score: FittableScore, session: SessionLike, attrs_before: set[str]
) -> int:
    """Merge ``score``'s calibration state over ``group`` (collective); return the global count.

    Every rank must call it. After it, ``score._state`` (or ``score._calib_buffer``) holds
    the rank-ordered union and ranks without samples have the calibration attributes of
    the first rank with samples.
    """
    local = _local_spec(score, session, attrs_before)
    specs: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(specs, local, group=group)
    _raise_failures(specs)
    full = _check_agreement(specs)
    total = sum(spec.n_samples for spec in specs)
    if not full:
        return 0
    reference: _Spec = specs[full[0]]
    comm = _comm_device(group)
    device = _local_device(score)
    state = score.__dict__.get("_state")
    if local.n_samples == 0:
        for name, value in reference.extras.items():
            score.__dict__[name] = value.to(device) if isinstance(value, Tensor) else value
        session.input_shape = reference.input_shape
        session.input_dtype = _dtype(reference.input_dtype)
        if not session._prepared and reference.input_shape is not None:
            # binding steps run on the first batch (e.g. head discovery) need a probe input:
            # zeros of the shared input shape (only the network's structure is used)
            probe = torch.zeros((1, *reference.input_shape), dtype=session.input_dtype)
            with torch.no_grad():
                session.prepare(probe.to(device))
    if reference.parts or reference.sums:
        assert isinstance(state, CalibState)
        merged = CalibState()
        for name, (shape, dtype_name) in reference.parts.items():
            if local.n_samples:
                part = state.cat(name)
            else:
                part = torch.empty((0, *shape), dtype=_dtype(dtype_name), device=device)
            merged.append(name, _gather_cat(part, group, comm))
        for name, (shape, dtype_name) in reference.sums.items():
            if local.n_samples:
                value = state.sum(name)
            else:
                value = torch.zeros(shape, dtype=_dtype(dtype_name), device=device)
            merged.add(name, _all_sum(value, group, comm))
        score._state = merged
    if reference.buffer is not None:
        score._calib_buffer = _merge_buffer(score, local, reference, group, comm, device)
    return total


def _merge_buffer(
    score: FittableScore,
    local: _Spec,
    reference: _Spec,
    group: Any,
    comm: torch.device,
    device: torch.device,
) -> list[tuple[Tensor, Any]]:
    """Gather the inputs/labels buffered by the default (reference ``calibrate``) protocol."""
    from scio.scores.core.calibration import concat_labels

    assert reference.buffer is not None
    shape, dtype_name, kind, label_dtype = reference.buffer
    items: list[tuple[Tensor, Any]] = score.__dict__.get("_calib_buffer") or []
    if local.n_samples:
        inputs = items[0][0] if len(items) == 1 else torch.cat([x for x, _ in items])
        labels = concat_labels([y for _, y in items])
    else:
        inputs = torch.empty((0, *shape), dtype=_dtype(dtype_name), device=device)
        labels = None
    all_inputs = _gather_cat(inputs, group, comm)
    if kind == "tensor":
        if labels is None:
            labels = torch.empty(0, dtype=_dtype(label_dtype), device=device)
        all_labels: Any = _gather_cat(labels, group, comm)
    elif kind == "object":
        lists: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(lists, [] if labels is None else list(labels), group=group)
        all_labels = [y for part in lists for y in part]
    else:
        all_labels = None
    return [(all_inputs, all_labels)]


def example_input(group: Any, local: Tensor | None, net: torch.nn.Module) -> Tensor:
    """One input sample for building recorders on every rank (collective).

    Ranks without data get the sample of the first rank that has one, on their network's
    device. Raises ``ValueError`` on every rank when no rank has any data.
    """
    examples: list[Any] = [None] * dist.get_world_size(group)
    mine = None if local is None else map_tensors(local, lambda t: t.detach().cpu())
    dist.all_gather_object(examples, mine, group=group)
    _raise_failures(examples)
    if local is not None:
        return local
    found = next((example for example in examples if example is not None), None)
    if found is None:
        msg = "`calib_data` is empty on every rank: calibration needs at least one sample"
        raise ValueError(msg)
    param = next(iter(net.parameters()), None)
    return found if param is None else map_tensors(found, lambda t: t.to(param.device))
