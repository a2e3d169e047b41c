"""Rerun only the part of a network downstream of a recorded layer (shaped forwards).

Scores that change an activation (ReAct's clipping, activation shaping) need the logits of
the network with that activation replaced. Running the whole network again costs a second
forward; everything upstream of the shaped layer is unchanged, so only the *tail* needs to
be recomputed. :class:`Tail` builds that tail once per recorder from a ``torch.fx`` trace in
which the recorded modules are leaves, then reruns it from the recorded activation.

The split is used only when it is provably equivalent: the tail must depend on nothing
computed upstream but the first recorded layer's output (no skip connection around it, no
use of the network input), every recorded module must be called exactly once, and the tail
must reproduce the network's own output on two samples of the first batch it sees.
Otherwise the shaped forward is a second full forward, and the reason is logged at debug level
(``logging.getLogger("scio.recorder.tail")``): never a wrong answer, at worst the old cost.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from scio.recorder.capture import Capture, running

if TYPE_CHECKING:
    from scio.recorder import Postprocessor, Recorder

__all__ = ["Tail", "build_tail_graph"]

logger = logging.getLogger(__name__)


class _LeafTracer(fx.Tracer):
    """A tracer keeping ``leaves`` (and torch's own modules) as single call nodes."""

    def __init__(self, leaves: set[nn.Module]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self._leaves or super().is_leaf_module(m, module_qualified_name)


def build_tail_graph(net: nn.Module, layer: nn.Module, leaves: set[nn.Module]) -> fx.GraphModule:
    """The part of ``net`` after its (single) call of ``layer``, as a function of its output.

    Raises ``ValueError`` with the reason when the network cannot be split there.
    """
    try:
        graph = _LeafTracer(leaves | {layer}).trace(net)
    except Exception as exc:  # dynamic control flow, untraceable ops, ...
        msg = f"torch.fx cannot trace the network ({type(exc).__name__}: {exc})"
        raise ValueError(msg) from exc
    targets = {module: name for name, module in net.named_modules(remove_duplicate=False)}
    layer_name = targets.get(layer)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer_name]
    if len(calls) != 1:
        msg = f"the shaped layer is called {len(calls)} times in the traced graph (expected 1)"
        raise ValueError(msg)
    start = calls[0]
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    output = next(n for n in nodes if n.op == "output")
    # Nodes the output needs, walking back from the output and stopping at the layer.
    needed: set[fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in needed or node is start or node.op == "get_attr":
            continue
        if position[node] < position[start]:
            if node.op == "placeholder":
                msg = "the tail uses the network input directly (e.g. a skip connection from it)"
            else:
                msg = f"the tail uses {node.name!r}, computed before the shaped layer"
            raise ValueError(msg)
        needed.add(node)
        stack.extend(node.all_input_nodes)
    tail = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: tail.placeholder("activation")}
    for node in nodes:
        if node in needed or (node.op == "get_attr" and any(u in needed for u in node.users)):
            env[node] = tail.node_copy(node, lambda n: env[n])
    tail.lint()
    return fx.GraphModule(net, tail)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        tol = 1e-3 if a.dtype in (torch.float16, torch.bfloat16) else 1e-5
        return bool(torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True))
    return False


class Tail:
    """Shaped forwards of one recorder: tail rerun when the network splits, else full.

    Args:
        rnet: the recorder; its first recorded layer (in call order) is where the tail
            starts. Built lazily by :meth:`scio.recorder.Recorder.shaped_forward`.

    Attributes:
        reason: why the tail is not used (``None`` while it is, or before the check).
    """

    def __init__(self, rnet: Recorder) -> None:
        self._rnet_ref = weakref.ref(rnet)  # the recorder owns its Tail: no reference cycle
        self._graph: Callable[[Any], Any] | None = None
        self._start = 0
        self._verified = False
        self._lock = threading.Lock()
        self.reason: str | None = None
        try:
            self._build()
        except ValueError as exc:
            self._fallback(str(exc))

    def _fallback(self, reason: str) -> None:
        self._graph = None
        self.reason = reason
        logger.debug("shaped forward falls back to a full forward: %s", reason)

    @property
    def _rnet(self) -> Recorder:
        rnet = self._rnet_ref()
        if rnet is None:
            msg = "The recorder of this tail was garbage-collected"
            raise RuntimeError(msg)
        return rnet

    def _build(self) -> None:
        rnet = self._rnet
        rows = rnet._rows
        recorded = set(rnet.recording)
        if not recorded:
            msg = "nothing is recorded"
            raise ValueError(msg)
        first = next(i for i, (depth_idx, _) in enumerate(rows) if depth_idx in recorded)
        depth, layer = rows[first][0][0], rows[first][1]
        modules = [module for depth_idx, module in rows if depth_idx in recorded]
        for module in modules:
            if sum(m is module for _, m in rows) != 1:
                msg = "a recorded module is called more than once per forward"
                raise ValueError(msg)
        # rows of the first layer's own submodules run inside it, not in the tail
        start = first + 1
        while start < len(rows) and rows[start][0][0] > depth:
            start += 1
        graph = build_tail_graph(rnet.net, layer, set(modules))
        self._graph, self._start = graph, start

    @property
    def splits(self) -> bool:
        """Whether shaped forwards rerun only the tail."""
        return self._graph is not None

    def run(
        self,
        inputs: Tensor,
        activations: tuple[Tensor, ...],
        activation_postproc: Postprocessor | Sequence[Postprocessor],
    ) -> Any:
        """Network output for ``inputs`` with ``activation_postproc`` applied."""
        rnet = self._rnet
        if self._graph is not None and activations and not self._verified:
            with self._lock:  # once, on two samples (the split is structural)
                if self._graph is not None and not self._verified:
                    self._verify(rnet, inputs, activations)
        graph = self._graph  # read once: a concurrent fallback cannot swap it mid-call
        if graph is not None and activations:
            return _run_graph(rnet, graph, self._start, activations[0], activation_postproc)
        return rnet(inputs, activation_postproc=activation_postproc, dont_record=True)

    def _verify(self, rnet: Recorder, inputs: Tensor, activations: tuple[Tensor, ...]) -> None:
        assert self._graph is not None
        try:
            probe = activations[0][:2]
            plain = _run_graph(rnet, self._graph, self._start, probe, None)
            full = rnet(inputs[:2], dont_record=True)
        except Exception as exc:
            self._fallback(f"the tail failed to run ({type(exc).__name__}: {exc})")
        else:
            if _same(plain, full):
                self._verified = True
            else:
                self._fallback("the tail does not reproduce the network output")


def _run_graph(
    rnet: Recorder,
    graph: Callable[[Any], Any],
    start: int,
    activation: Any,
    activation_postproc: Postprocessor | Sequence[Postprocessor] | None,
) -> Any:
    """Run ``graph`` (the network downstream of row ``start - 1``, a function of that row's
    output ``activation``) under its own per-call capture, with ``activation_postproc``
    applied to the recorded layers, the first one included."""
    seqs: dict[nn.Module, list[tuple[Any, bool]]] = {}
    recorded = set(rnet.recording)
    for depth_idx, module in rnet._rows[start:]:
        seqs.setdefault(module, []).append((depth_idx, depth_idx in recorded))
    capture = Capture(
        rnet._owner, seqs, {}, activation_postproc, dont_record=True, n_recorded=len(recorded)
    )
    first = capture.single
    if capture.postprocs is not None:
        first = next(capture.postprocs, None)
    if first is not None:
        shaped = first(activation)
        activation = activation if shaped is None else shaped
    with running(capture):
        return graph(activation)
