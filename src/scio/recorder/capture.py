"""Per-call capture: one forward's activations, taps and post-processing, owned by the call.

A :class:`Capture` is created by each recorder forward and holds everything about that call:
which rows of each module remain, the post-processors still to apply, the recorded
activations and the tapped inputs. The forward hooks find the call they serve through a
context variable (:data:`_ACTIVE`), set by the call and reset in ``finally``; nothing about a
call is ever stored on the :class:`~scio.recorder.Recorder`. Each thread (and each asyncio
task) therefore sees only its own calls, and one recorder serves many threads at once.

The finished captures of the latest calls in the current context are kept (bounded, one per
recorder) so that ``rnet(x)`` followed by ``rnet.activations`` works as in the reference:
that view is the latest call *in the current thread*, never another thread's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from scio.recorder.io import reduce_tokens

__all__ = [
    "Capture",
    "DepthIdx",
    "Postprocessor",
    "SharedForward",
    "active",
    "last_capture",
    "remember",
    "shared_forward",
    "usable_shared",
]

DepthIdx: TypeAlias = tuple[int, int]
Postprocessor: TypeAlias = Callable[[Tensor], Tensor | None]
#: ``{module: [(depth_idx, recorded), ...]}``: the rows of each module in call order
RowSeqs: TypeAlias = dict[nn.Module, list[tuple[DepthIdx, bool]]]

#: How many finished captures (of distinct recorders) the current context remembers.
LAST_CAPTURES = 8


class Capture:
    """The activations, taps and post-processing state of one recorder call.

    Attributes:
        owner: the token of the recorder that made the call.
        activations: ``{depth_idx: output}`` of the recorded layers, in firing order.
        tapped: ``{module: [(input, output), ...]}`` of every call of each tapped module.
        out: the network output once the call returned.
    """

    __slots__ = (
        "activations",
        "counts",
        "dont_record",
        "mask",
        "n_recorded",
        "out",
        "owner",
        "parent",
        "postprocs",
        "seqs",
        "single",
        "tapped",
        "taps",
        "tokens",
    )

    def __init__(
        self,
        owner: object,
        seqs: RowSeqs,
        taps: Mapping[nn.Module, None],
        postproc: Postprocessor | Sequence[Postprocessor] | None = None,
        dont_record: bool = False,
        n_recorded: int = 0,
    ) -> None:
        self.owner = owner
        self.n_recorded = n_recorded  # for messages
        self.seqs = seqs  # read-only here: calls are counted in `counts`
        self.taps = taps
        self.counts: dict[nn.Module, int] = {}
        self.dont_record = dont_record
        self.single: Postprocessor | None = None
        self.postprocs: Iterator[Postprocessor] | None = None
        self.activations: dict[DepthIdx, Any] = {}
        self.tapped: dict[nn.Module, list[tuple[Any, Any]]] = {}
        self.out: Any = None
        self.parent: Capture | None = None
        self.tokens: Mapping[DepthIdx, Any] = {}  # token reduction per recorded layer
        self.mask: Any = None  # the call's attention mask, for token means
        if isinstance(postproc, Sequence):
            self.postprocs = iter(list(postproc))
        elif postproc is not None:
            if not callable(postproc):
                msg = (
                    "`activation_postproc` must be None, a callable or a list of callables "
                    f"(got {type(postproc).__name__})"
                )
                raise TypeError(msg)
            self.single = postproc

    def next_postproc(self) -> Postprocessor | None:
        """The post-processor of the next recorded layer that fires."""
        if self.postprocs is None:
            return self.single
        postproc = next(self.postprocs, None)
        if postproc is None:
            msg = (
                "There were not enough postprocessing functions for every recorded layers "
                f"({self.n_recorded}). If you wish to use the same function for every recorded "
                "layer, use the signature `rnet(*args, activation_postproc: Postprocessor, "
                "**kwargs). See `help(rnet.forward)` for more information"
            )
            raise ValueError(msg)
        return postproc

    def on_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward-hook body: record/tap ``module``'s output; a returned value replaces it."""
        if module in self.taps:
            self.tapped.setdefault(module, []).append((args[0] if args else None, output))
        call = self.counts.get(module, 0)
        self.counts[module] = call + 1
        seq = self.seqs[module]
        if call >= len(seq):
            msg = (
                f"{type(module).__name__} was called {call + 1} times in this forward but "
                f"{len(seq)} time(s) when the Recorder listed the layers: the network's "
                "control flow is dynamic, and its layer identifiers are unreliable"
            )
            raise RuntimeError(msg)
        depth_idx, requested = seq[call]
        if not requested:
            return None
        if not self.dont_record:
            if self.tokens:
                self.activations[depth_idx] = reduce_tokens(
                    output, self.tokens.get(depth_idx), self.mask
                )
            else:
                self.activations[depth_idx] = output
        postproc = self.next_postproc()
        if postproc is None:
            return None
        return postproc(output)

    @property
    def tapped_inputs(self) -> dict[nn.Module, Any]:
        """(First) input of each tapped module at its latest call."""
        return {module: calls[-1][0] for module, calls in self.tapped.items()}

    def view(self) -> Mapping[DepthIdx, Any]:
        """Read-only view of the recorded activations."""
        return MappingProxyType(self.activations)


#: The captures of the calls running in this context, innermost first (linked by `parent`).
_ACTIVE: ContextVar[Capture | None] = ContextVar("scio_active_capture", default=None)
#: The finished captures of the latest calls in this context, latest first.
_LAST: ContextVar[tuple[Capture, ...]] = ContextVar("scio_last_captures", default=())


def active(owner: object) -> Capture | None:
    """The innermost running capture of ``owner`` in this context (``None``: no call of it
    is running here, e.g. a direct ``net(x)`` or another thread's call)."""
    capture = _ACTIVE.get()
    while capture is not None and capture.owner is not owner:
        capture = capture.parent
    return capture


class running:  # noqa: N801 - a context manager, like torch.no_grad
    """Make ``capture`` the innermost running capture of this context."""

    __slots__ = ("capture", "token")

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.token: Any = None

    def __enter__(self) -> Capture:
        self.capture.parent = _ACTIVE.get()
        self.token = _ACTIVE.set(self.capture)
        return self.capture

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self.token)
        self.capture.parent = None


def remember(capture: Capture) -> None:
    """Keep ``capture`` as its recorder's latest finished call in this context."""
    previous = _LAST.get()
    if previous and previous[0].owner is capture.owner:  # the usual case: the same recorder
        _LAST.set((capture, *previous[1:]))
        return
    kept = tuple(c for c in previous if c.owner is not capture.owner)[: LAST_CAPTURES - 1]
    _LAST.set((capture, *kept))


def last_capture(owner: object) -> Capture | None:
    """The latest finished call of ``owner`` in this context, if remembered."""
    for capture in _LAST.get():
        if capture.owner is owner:
            return capture
    return None


@dataclass
class SharedForward:
    """The result of one forward of ``net`` on ``inputs`` that other recorders may reuse.

    While :class:`shared_forward` is active, a recorder wrapping the same ``net`` called on
    the *same* ``inputs`` object (no post-processing, no autograd) returns ``out`` and takes
    its recorded activations and tapped inputs from here instead of running the network.
    This is how :func:`scio.scores.infer_jointly` runs many scores with one forward.
    """

    net: nn.Module
    inputs: Tensor
    out: Any
    rows: tuple[tuple[DepthIdx, int], ...]
    activations: dict[DepthIdx, Any] = field(default_factory=dict)
    tapped: dict[nn.Module, list[tuple[Any, Any]]] = field(default_factory=dict)


_SHARED: ContextVar[SharedForward | None] = ContextVar("scio_shared_forward", default=None)


def current_shared() -> SharedForward | None:
    """The shared forward published in this context, if any."""
    return _SHARED.get()


def usable_shared(
    net: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    rows: tuple[tuple[DepthIdx, int], ...],
    recording: Sequence[DepthIdx],
    taps: Mapping[nn.Module, None],
) -> SharedForward | None:
    """The shared forward published in this context if a recorder of ``net`` (listing
    ``rows``, recording ``recording``, tapping ``taps``) called with ``args``/``kwargs`` may
    take its results from it: same network, the very same single input object, no autograd,
    and every layer and tap it needs captured."""
    shared = _SHARED.get()
    if (
        shared is None
        or shared.net is not net
        or len(args) != 1
        or kwargs
        or args[0] is not shared.inputs
        or torch.is_grad_enabled()
        or shared.rows != rows
        or any(depth_idx not in shared.activations for depth_idx in recording)
        or any(module not in shared.tapped for module in taps)
    ):
        return None
    return shared


class shared_forward:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Context manager publishing a :class:`SharedForward` to the recorders of its net."""

    def __init__(self, shared: SharedForward) -> None:
        self.shared = shared
        self._token: Any = None

    def __enter__(self) -> SharedForward:
        self._token = _SHARED.set(self.shared)
        return self.shared

    def __exit__(self, *exc: object) -> None:
        _SHARED.reset(self._token)
