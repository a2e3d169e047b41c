"""A recorder-like object serving a score's own code from traced graphs.

A score's ``get_conformity`` talks to its recorder: ``rnet(x)``, ``rnet.activations``,
``rnet._tapped_inputs``, ``rnet.shaped_forward(...)``, ``rnet.net``. :class:`Replay` answers
the same calls from the graphs of :mod:`scio.export.graph`, so each score's arithmetic is
reused as it is. What belongs to one call (the logits, activations and taps of the module's
input) lives in a :class:`Call` found through a context variable, set by the module's
``forward`` and reset when it returns: nothing is stored on the replay, the module or the
network, so one module serves many threads, and tracing it (``torch.export``) sees a pure
function of its input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from scio.export.errors import ExportError, extra_passes_message
from scio.export.graph import NetworkGraphs
from scio.recorder.capture import DepthIdx
from scio.recorder.io import read_output, reduce_tokens

__all__ = ["ACTIVE", "Call", "Replay"]

_EMPTY: Mapping[Any, Any] = MappingProxyType({})


class Call:
    """One forward of an exported module: its input with the network's output, activations
    and taps on it, and the activations and taps of the latest network pass the score ran
    (a perturbed copy of the input, say)."""

    __slots__ = (
        "acts",
        "extra_passes",
        "inputs",
        "latest_acts",
        "latest_tapped",
        "out",
        "owner",
        "parent",
        "tapped",
    )

    def __init__(self, owner: Replay, inputs: Any, out: Any, acts: Any, tapped: Any) -> None:
        self.owner = owner
        self.inputs = inputs
        self.out = out
        self.acts = acts  # tuple, in firing order
        self.tapped = tapped  # tuple of (input, output), in firing order
        self.latest_acts = acts
        self.latest_tapped = tapped
        self.extra_passes = 0  # network passes on other inputs than the module's
        self.parent: Call | None = None


#: The calls of exported modules running in this context, innermost first (``Call.parent``).
ACTIVE: ContextVar[Call | None] = ContextVar("scio_export_call", default=None)


class Replay(nn.Module):
    """The recorder of an exported score: the network's graphs and the recorded rows.

    Args:
        net: the network (a copy owned by the exported module).
        seqs: ``{module: [(depth_idx, recorded), ...]}`` of every module call (as a
            recorder's ``_record_seqs``, on ``net``'s modules).
        taps: modules whose inputs the score reads (e.g. its classifier head).

    Call :meth:`build` once every tap is known (scores tap their head while binding).
    ``self._net`` is then the plain graph module, named so that parameter names match a
    :class:`~scio.recorder.Recorder`'s (``_net.<module path>.<name>``).
    """

    _seqs: dict[nn.Module, list[tuple[DepthIdx, bool]]]
    _taps: dict[nn.Module, None]

    def __init__(
        self,
        net: nn.Module,
        seqs: dict[nn.Module, list[tuple[DepthIdx, bool]]],
        taps: Sequence[nn.Module],
    ) -> None:
        super().__init__()
        self.__dict__["_source"] = net
        self.__dict__["_seqs"] = seqs
        self.__dict__["_taps"] = dict.fromkeys(taps)
        self.__dict__["_graphs"] = None
        self.score_name = "The score"
        self.output_spec: Any = None  # the recorder's `output=`: where the logits are
        self.tokens: dict[DepthIdx, Any] = {}  # the recorder's token reduction per layer
        self._recording: tuple[DepthIdx, ...] = tuple(
            sorted({row for seq in seqs.values() for row, wanted in seq if wanted})
        )

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Replay:
        super()._apply(fn, recurse)
        graphs = self.__dict__["_graphs"]
        if graphs is not None:  # the shaped and tail graphs read the plain graph's tensors
            graphs.sync()
        return self

    def build(self) -> NetworkGraphs:
        """Trace the network (see :class:`~scio.export.graph.NetworkGraphs`)."""
        graphs = NetworkGraphs(self.__dict__["_source"], self._seqs, tuple(self._taps))
        self.__dict__["_graphs"] = graphs
        self._net = graphs.plain
        self.__dict__["_plain"] = graphs.plain.forward
        return graphs

    # -- the recorder interface used by scores ------------------------------------------------
    @property
    def net(self) -> nn.Module:
        """The network: the plain graph module once built (same module objects)."""
        graphs = self.__dict__["_graphs"]
        return self.__dict__["_source"] if graphs is None else graphs.plain

    @property
    def recording(self) -> tuple[DepthIdx, ...]:
        """Recorded layer identifiers, sorted."""
        return self._recording

    @property
    def recorded_modules(self) -> dict[DepthIdx, nn.Module]:
        """``{depth_idx: module}`` of the recorded layers."""
        return {row: m for m, seq in self._seqs.items() for row, wanted in seq if wanted}

    @property
    def recorded_params(self) -> dict[str, nn.Parameter]:
        """Parameters of the recorded modules, named as in ``self.named_parameters()``."""
        owned = {id(p) for m in self.recorded_modules.values() for p in m.parameters()}
        return {name: p for name, p in self.named_parameters() if id(p) in owned}

    def _tap(self, *modules: nn.Module) -> None:
        taps = self._taps
        if all(module in taps for module in modules):
            return
        if self.__dict__["_graphs"] is not None:
            msg = "An exported score cannot tap a module it did not tap when it was exported"
            raise RuntimeError(msg)
        known = set(self._seqs)
        for module in modules:
            if module not in known:
                msg = f"Cannot tap {type(module).__name__}: it is not a layer of the network"
                raise ValueError(msg)
            taps[module] = None

    def _current(self) -> Call:
        call = ACTIVE.get()
        while call is not None and call.owner is not self:
            call = call.parent
        if call is None:
            msg = "The recorder of an exported score is only usable inside the module's forward"
            raise RuntimeError(msg)
        return call

    def _run(self, inputs: Any, postprocs: Any) -> tuple[Any, Any, Any]:
        graphs: NetworkGraphs = self.__dict__["_graphs"]
        if postprocs is None:
            out, acts, tapped = self.__dict__["_plain"](inputs)
        elif graphs.shaped is None:
            msg = f"The network cannot run with post-processed activations: {graphs.shaped_reason}"
            raise RuntimeError(msg)
        else:
            out, acts, tapped = graphs.shaped.forward(inputs, self._postprocs(postprocs))
        return self.read(out), acts, tapped

    def read(self, out: Any) -> Any:
        """The logits of a raw network output (the recorder's ``output=`` rule)."""
        if type(out) is Tensor and self.output_spec is None:
            return out
        return read_output(out, self.output_spec)

    def _postprocs(self, postproc: Any) -> Sequence[Callable[[Any], Any]]:
        n = len(self.__dict__["_graphs"].rows)
        if callable(postproc):
            return (postproc,) * n
        if not isinstance(postproc, Sequence):
            msg = (
                "`activation_postproc` must be None, a callable or a list of callables "
                f"(got {type(postproc).__name__})"
            )
            raise TypeError(msg)
        if len(postproc) < n:
            msg = (
                "There were not enough postprocessing functions for every recorded layers "
                f"({n}). If you wish to use the same function for every recorded layer, use the "
                "signature `rnet(*args, activation_postproc: Postprocessor, **kwargs)`"
            )
            raise ValueError(msg)
        return tuple(postproc)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # no module-call machinery
        return self.forward(*args, **kwargs)

    def forward(
        self,
        *args: Any,
        activation_postproc: Any = None,
        dont_record: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The network output for ``args[0]``: the module input's output is reused; any
        other input (e.g. a perturbed copy) runs the graph and becomes the latest pass."""
        call = self._current()
        if len(args) != 1 or kwargs:
            msg = "An exported score's network takes exactly one positional input"
            raise TypeError(msg)
        inputs = args[0]
        if activation_postproc is None and inputs is call.inputs:
            out, acts, tapped = call.out, call.acts, call.tapped
        else:
            if inputs is not call.inputs:
                call.extra_passes += 1
                if torch.compiler.is_exporting():
                    raise ExportError(extra_passes_message(self.score_name))
            out, acts, tapped = self._run(inputs, activation_postproc)
        call.latest_acts = () if dont_record else acts
        call.latest_tapped = tapped
        return out

    @property
    def activations(self) -> Mapping[DepthIdx, Any]:
        """Recorded activations of the latest pass of the current call, in firing order."""
        acts = self._current().latest_acts
        if not acts:
            return _EMPTY
        rows = self.__dict__["_graphs"].rows
        tokens = self.tokens
        if tokens:
            acts = tuple(reduce_tokens(a, tokens.get(row)) for row, a in zip(rows, acts))
        return MappingProxyType(dict(zip(rows, acts)))

    @property
    def _tapped_calls(self) -> Mapping[nn.Module, list[tuple[Any, Any]]]:
        calls: dict[nn.Module, list[tuple[Any, Any]]] = {}
        modules = self.__dict__["_graphs"].tapped_modules
        for module, pair in zip(modules, self._current().latest_tapped):
            calls.setdefault(module, []).append(pair)
        return calls

    @property
    def _tapped_inputs(self) -> dict[nn.Module, Any]:
        modules = self.__dict__["_graphs"].tapped_modules
        return {module: pair[0] for module, pair in zip(modules, self._current().latest_tapped)}

    def shaped_forward(
        self,
        inputs: Tensor,
        activations: Sequence[Tensor],
        activation_postproc: Any,
    ) -> Any:
        """The network output with ``activation_postproc`` applied to the recorded layers,
        rerunning only the tail after the first one when the network splits there."""
        graphs: NetworkGraphs = self.__dict__["_graphs"]
        if graphs.tail is not None and activations and not self.tokens:
            return self.read(
                graphs.tail.forward(activations[0], self._postprocs(activation_postproc))
            )
        return self._run(inputs, activation_postproc)[0]
