"""The network as ``torch.fx`` graphs that return what a score reads: no hooks, no state.

:func:`trace_network` traces a network once (in the manner of torchvision's
``create_feature_extractor``) while noting the input and output of every call of the
*watched* modules (the recorded layers and the tapped classifier heads). From that trace,
:class:`NetworkGraphs` builds three pure functions of their inputs:

* ``plain(x) -> (out, activations, tapped)``: the network output, the recorded activations
  (in the order a recorder's hooks fire) and the ``(input, output)`` of every tapped call;
* ``shaped(x, postprocs) -> (out, activations, tapped)``: the same network with
  ``postprocs[i]`` applied to the ``i``-th recorded activation, everything downstream seeing
  the result (what a recorder's ``activation_postproc`` does with hooks);
* ``tail(activation, postprocs) -> out``: only the part downstream of the first recorded
  layer, when it depends on nothing upstream but that layer's output (as
  :class:`scio.recorder.tail.Tail`), else ``None``.

Watched modules without watched submodules are traced as single calls (leaves), so the
graphs hold the very module objects a score looks up by name (e.g. its head).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from scio.recorder.capture import DepthIdx

__all__ = ["ModuleCall", "NetworkGraphs", "apply_postproc", "trace_network"]


@dataclass
class ModuleCall:
    """One call of a watched module in the trace: its first input and its output (fx values
    of the trace), and the positions of the last graph node before and after it."""

    module: nn.Module
    args: Any
    output: Any
    start: int
    end: int


class _CallTracer(fx.Tracer):
    """A tracer noting every call of ``watched`` modules, in the order they return (the order
    in which forward hooks fire); ``leaves`` are traced as single call nodes."""

    def __init__(self, watched: set[nn.Module], leaves: set[nn.Module]) -> None:
        super().__init__()
        self.watched = watched
        self.leaves = leaves
        self.calls: list[ModuleCall] = []
        self._count = 0

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        self._count += 1
        return super().create_node(*args, **kwargs)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        start = self._count
        out = super().call_module(m, forward, args, kwargs)
        if m in self.watched:
            self.calls.append(ModuleCall(m, args[0] if args else None, out, start, self._count))
        return out


def _leaves(net: nn.Module, watched: set[nn.Module]) -> set[nn.Module]:
    """The watched modules that contain no other watched module."""
    return {
        module
        for module in watched
        if module is not net and not any(m in watched for m in list(module.modules())[1:])
    }


def trace_network(net: nn.Module, watched: set[nn.Module]) -> tuple[fx.Graph, list[ModuleCall]]:
    """Trace ``net`` with ``torch.fx``, noting every call of the ``watched`` modules.

    A watched ``net`` itself is noted as the last call (its hooks fire last).

    Raises:
        ValueError: ``torch.fx`` cannot trace the network, with the reason.
    """
    tracer = _CallTracer(watched, _leaves(net, watched))
    try:
        graph = tracer.trace(net)
    except Exception as exc:
        msg = f"torch.fx cannot trace the network ({type(exc).__name__}: {exc})"
        raise ValueError(msg) from exc
    calls = list(tracer.calls)
    if net in watched:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        output = next(n for n in graph.nodes if n.op == "output")
        first = placeholders[0] if placeholders else None
        calls.append(ModuleCall(net, first, output.args[0], 0, tracer._count))
    return graph, calls


def apply_postproc(value: Any, postprocs: Sequence[Callable[[Any], Any]], i: int) -> Any:
    """``postprocs[i](value)``, or ``value`` when it returns ``None`` (a recorder's rule)."""
    result = postprocs[i](value)
    return value if result is None else result


def _as_node(value: Any) -> Any:
    return value.node if isinstance(value, fx.Proxy) else value


@dataclass
class _Recorded:
    row: DepthIdx
    call: ModuleCall


class NetworkGraphs:
    """The plain, shaped and tail graphs of ``net`` for the given recorded rows and taps.

    Args:
        net: the network (its modules are shared with the graphs, not copied).
        seqs: ``{module: [(depth_idx, recorded), ...]}``, the rows of every module call in
            call order (a recorder's ``_record_seqs``).
        taps: the modules whose calls' ``(input, output)`` are returned.

    Raises:
        ValueError: ``torch.fx`` cannot trace the network, or its trace calls a recorded or
            tapped module another number of times than the recorder saw.
    """

    def __init__(
        self,
        net: nn.Module,
        seqs: dict[nn.Module, list[tuple[DepthIdx, bool]]],
        taps: Sequence[nn.Module],
    ) -> None:
        recorded_modules = {m for m, seq in seqs.items() if any(wanted for _, wanted in seq)}
        watched = recorded_modules | set(taps)
        graph, calls = trace_network(net, watched)
        counts: dict[nn.Module, int] = {}
        recorded: list[_Recorded] = []
        tapped: list[ModuleCall] = []
        for call in calls:
            i = counts.get(call.module, 0)
            counts[call.module] = i + 1
            seq = seqs.get(call.module, [])
            if call.module in recorded_modules:
                if i >= len(seq):
                    break  # reported below
                row, wanted = seq[i]
                if wanted:
                    recorded.append(_Recorded(row, call))
            if call.module in taps:
                tapped.append(call)
        for module in watched:
            expected = len(seqs.get(module, [])) if module in recorded_modules else None
            if counts.get(module, 0) == 0 or (expected is not None and counts[module] != expected):
                name = type(module).__name__
                msg = (
                    f"the traced network calls the recorded or tapped {name} "
                    f"{counts.get(module, 0)} time(s), the recorder saw {expected or 'at least 1'}"
                    " (dynamic control flow?)"
                )
                raise ValueError(msg)
        self.net = net
        self.rows: tuple[DepthIdx, ...] = tuple(r.row for r in recorded)
        self.tapped_modules: tuple[nn.Module, ...] = tuple(call.module for call in tapped)
        self._graph = graph
        self._recorded, self._tapped = recorded, tapped
        self.plain = self._build(shaped=False)
        self.shaped: fx.GraphModule | None = None
        self.tail: fx.GraphModule | None = None
        self.shaped_reason: str | None = None
        self.tail_reason: str | None = None
        try:
            self.shaped = self._build(shaped=True)
        except ValueError as exc:
            self.shaped_reason = str(exc)
        else:
            try:
                self.tail = self._build_tail(self.shaped)
            except ValueError as exc:
                self.tail_reason = str(exc)

    def sync(self) -> None:
        """Point the shaped and tail graphs' attributes at the plain graph's (after ``.to()``
        replaced tensors there; the modules themselves are shared)."""
        for graph in (self.shaped, self.tail):
            if graph is None:
                continue
            for node in graph.graph.nodes:
                if node.op == "get_attr":
                    *path, name = str(node.target).split(".")
                    source = self.plain.get_submodule(".".join(path))
                    target = graph.get_submodule(".".join(path))
                    if target is not source:
                        setattr(target, name, getattr(source, name))

    # -- building ---------------------------------------------------------------------------
    def _build(self, *, shaped: bool) -> fx.GraphModule:
        """A graph module of ``x`` (and ``postprocs`` when ``shaped``) returning
        ``(out, activations, tapped)``."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        old_output: fx.Node | None = None
        nodes = list(self._graph.nodes)
        position: dict[fx.Node, int] = {}  # new node -> position of the traced one
        for i, node in enumerate(nodes):
            if node.op == "output":
                old_output = node
                continue
            env[node] = graph.node_copy(node, lambda n: env[n])
            position[env[node]] = i
        assert old_output is not None

        def mapped(value: Any) -> Any:
            traced = fx.node.map_aggregate(value, _as_node)
            return fx.node.map_arg(traced, lambda n: env[n])

        slots: dict[fx.Node, tuple[fx.Node, int]] = {}  # value -> (its slot, end position)

        def seen_by(value: Any, at: int) -> Any:
            """``value`` as code after node position ``at`` sees it: post-processed by every
            recorded call that ended by then (a call's hook replaces its module's output)."""

            def replace(node: fx.Node) -> fx.Node:
                while node in slots and slots[node][1] <= at:
                    node = slots[node][0]
                return node

            return fx.node.map_arg(mapped(value), replace)

        hooked = []  # the value each recorded call's hook sees, in firing order
        postprocs: fx.Node | None = None
        if shaped:
            placeholders = [n for n in graph.nodes if n.op == "placeholder"]
            anchor = placeholders[-1] if placeholders else None
            with graph.inserting_after(anchor):
                postprocs = graph.placeholder("postprocs")
        for i, rec in enumerate(self._recorded):
            raw = seen_by(rec.call.output, rec.call.end)
            hooked.append(raw)
            if postprocs is None:
                continue
            if not isinstance(raw, fx.Node):
                name = type(rec.call.module).__name__
                msg = (
                    f"the recorded layer {rec.row} ({name}) returns "
                    f"{type(rec.call.output).__name__}, not one tensor: it cannot be "
                    "post-processed"
                )
                raise ValueError(msg)
            users = [u for u in raw.users if position.get(u, -1) >= rec.call.end]
            with graph.inserting_after(raw):
                slot = graph.call_function(apply_postproc, (raw, postprocs, i))
            for user in users:
                user.replace_input_with(raw, slot)
            slots[raw] = (slot, rec.call.end)
        end = len(nodes)
        out = seen_by(old_output.args[0], end)
        activations = tuple(hooked)
        hooked_by_call = {id(rec.call): value for rec, value in zip(self._recorded, hooked)}
        tapped = tuple(
            (
                seen_by(call.args, call.start),
                hooked_by_call.get(id(call), seen_by(call.output, call.end)),
            )
            for call in self._tapped
        )
        graph.output((out, activations, tapped))
        graph.lint()
        return fx.GraphModule(self.net, graph)

    def _build_tail(self, shaped: fx.GraphModule) -> fx.GraphModule:
        """The shaped graph downstream of the first recorded layer, as a function of that
        layer's raw output and the post-processors."""
        nodes = list(shaped.graph.nodes)
        slots = [n for n in nodes if n.op == "call_function" and n.target is apply_postproc]
        if not slots:
            msg = "nothing is recorded"
            raise ValueError(msg)
        first = next(s for s in slots if s.args[2] == 0)
        start = first.args[0]
        assert isinstance(start, fx.Node)
        postprocs = next(n for n in nodes if n.op == "placeholder" and n.name == "postprocs")
        output = nodes[-1]
        position = {node: i for i, node in enumerate(nodes)}
        out = output.args[0][0]
        needed: set[fx.Node] = set()
        stack: list[fx.Node] = []
        fx.node.map_arg(out, stack.append)
        while stack:
            node = stack.pop()
            if node in needed or node is start or node is postprocs or node.op == "get_attr":
                continue
            if position[node] < position[start]:
                if node.op == "placeholder":
                    msg = "the tail uses the network input directly (e.g. a skip connection)"
                else:
                    msg = f"the tail uses {node.name!r}, computed before the first recorded layer"
                raise ValueError(msg)
            needed.add(node)
            stack.extend(node.all_input_nodes)
        tail = fx.Graph()
        env: dict[fx.Node, fx.Node] = {
            start: tail.placeholder("activation"),
            postprocs: tail.placeholder("postprocs"),
        }
        for node in nodes:
            if node in needed or (node.op == "get_attr" and any(u in needed for u in node.users)):
                env[node] = tail.node_copy(node, lambda n: env[n])
        tail.output(fx.node.map_arg(out, lambda n: env[n]))
        tail.lint()
        return fx.GraphModule(self.net, tail)
