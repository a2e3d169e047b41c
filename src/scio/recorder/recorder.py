"""Record intermediate activations of any :class:`torch.nn.Module`.

A :class:`Recorder` wraps a network, lists its layers (one row per module *call*, with
torchinfo's ``(depth, idx)`` identifiers) and records the outputs of the layers chosen
with :meth:`Recorder.record` during its own forward passes. Hooks are weakly referenced:
deleting the recorder leaves the wrapped network exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeAlias

import torch
import torchinfo
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from scio.recorder.capture import (
    Capture,
    DepthIdx,
    Postprocessor,
    SharedForward,
    active,
    current_shared,
    last_capture,
    remember,
    running,
    shared_forward,
    usable_shared,
)
from scio.recorder.io import (
    OutputSpec,
    TokenReduction,
    check_output_spec,
    check_token,
    read_output,
)
from scio.recorder.layers import (
    DEFAULT_SUMMARY_KWARGS,
    check_static_flow,
    get_layer_info_depth_idx,
    lazy_func,
    module_names,
    rows_key,
    summarize,
)
from scio.recorder.taps import InputTaps

__all__ = [
    "Capture",
    "DepthIdx",
    "Postprocessor",
    "Recorder",
    "SharedForward",
    "get_layer_info_depth_idx",
    "lazy_func",
    "shared_forward",
]

LayerSpec: TypeAlias = DepthIdx | str

_EMPTY: Mapping[DepthIdx, Any] = MappingProxyType({})


def _hook_for(owner: object) -> Callable[..., Any]:
    """The forward hook of one recorder: it serves the recorder's call running in the
    current context, found by the recorder's ``owner`` token (it references neither the
    recorder nor any call, so deleting the recorder removes its hooks)."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        capture = active(owner)
        if capture is None:  # a direct `net(x)`, another recorder's or another thread's call
            return None
        return capture.on_output(module, args, output)

    return hook


def _compiled_original(net: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile``d network wraps (``None`` for a plain module)."""
    original = getattr(net, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else None


class Recorder(InputTaps, nn.Module):
    """Wrap ``net`` to record the outputs of chosen layers during forward passes.

    Args:
        net: the network to wrap (stored as ``self._net``, also returned by :attr:`net`).
        force_static_flow: check with ``torch.fx.symbolic_trace`` that the control flow of
            ``net`` is static, so that layer identifiers are the same at every call (for a
            network called with a dict batch, which fx cannot trace, every forward checks
            that each recorded module fired as listed instead). With
            ``False``, dynamic networks are accepted at your own risk: a layer that is not
            called, or called a different number of times, makes recording unreliable.
        output: how the network's output is read as logits (extension): ``None`` (default)
            takes a tensor as is, the ``logits`` of a ``ModelOutput`` or dict, the first
            element of a tuple; a field name (``"logits"``) or a callable overrides it.
        compile: compile the recorded network once with ``torch.compile`` (extension), hooks
            included; a network already compiled (``torch.compile(net)``) is accepted as is.
        **summary_kwargs: passed to ``torchinfo.summary``; ``input_data`` or ``input_size``
            is required (one forward pass lists the layers). A dict ``input_data`` (e.g. a
            Hugging Face batch) makes the recorder call the network as ``net(**batch)``.

    Layers are identified by torchinfo's ``(depth, idx)`` pairs (``idx`` counts rows at that
    depth over the whole network); the whole network is ``(0, 1)``. Modules used
    functionally (``F.relu``) are invisible. Extension: layers may also be selected by
    module name as ``named_modules()`` prints it, e.g. ``rnet.record("avgpool")`` or
    ``rnet.record("vit.layernorm", token="cls")``.

    Every call's activations belong to that call (:meth:`capture`); one recorder serves many
    threads at once, and hooks sit only on the modules recorded or tapped.
    """

    summary: torchinfo.ModelStatistics
    # set in __dict__ (not as nn.Module attributes): read on every call
    _inner: nn.Module
    _output: OutputSpec
    _keyword_inputs: bool
    _input_keys: tuple[str, ...] | None
    _input_key: str | None
    _owner: object

    def __init__(
        self,
        net: nn.Module,
        /,
        *,
        force_static_flow: bool = True,
        output: OutputSpec = None,
        compile: bool = False,
        **summary_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            msg = f"`net` must be a torch.nn.Module (got {type(net).__name__})"
            raise TypeError(msg)
        check_output_spec(output)
        self._net = net
        # a compiled network is listed, hooked and traced through the module it wraps
        inner = _compiled_original(net) or net
        self.__dict__["_inner"] = inner
        self.__dict__["_output"] = output
        # identifies this recorder's calls to its hooks (see scio.recorder.capture)
        self.__dict__["_owner"] = object()
        # hooks sit only on the modules recorded or tapped now (see `_sync_hooks`)
        self.__dict__["_hooks"] = {}
        self.__dict__["_hooking"] = True
        self.__dict__["_tokens"] = {}
        self._taps: dict[nn.Module, None] = {}
        self._tail: Any = None  # scio.recorder.tail.Tail, built lazily by `shaped_forward`
        kwargs = {**DEFAULT_SUMMARY_KWARGS, **summary_kwargs}
        if "input_size" not in kwargs and "input_data" not in kwargs:
            msg = "You must provide `input_data` or `input_size`"
            raise ValueError(msg)
        # a dict batch is passed as keyword arguments, as torchinfo does
        keyword_inputs = isinstance(kwargs.get("input_data"), Mapping)
        self.__dict__["_keyword_inputs"] = keyword_inputs
        data: Any = kwargs.get("input_data")
        self.__dict__["_input_keys"] = tuple(data) if keyword_inputs else None
        # a one-tensor dict batch ({"pixel_values": x}): a bare tensor goes under its key
        self.__dict__["_input_key"] = (
            next(iter(data)) if keyword_inputs and len(data) == 1 else None
        )
        if force_static_flow and not keyword_inputs:
            # torch.fx cannot trace keyword-driven models (Hugging Face): for those, every
            # forward checks instead that each recorded module fired as listed
            check_static_flow(inner)
        self.summary = summarize(inner, kwargs)
        if keyword_inputs:  # deep models: print the names `record` takes ("bert.pooler")
            names = module_names(inner)
            for info in self.summary.summary_list:
                info.var_name = names.get(info.module, "") or info.var_name
        self._rows: tuple[tuple[DepthIdx, nn.Module], ...] = tuple(
            (get_layer_info_depth_idx(info), info.module) for info in self.summary.summary_list
        )
        self._rows_key = rows_key(self._rows)
        self._recording: tuple[DepthIdx, ...] = ()
        self._record_seqs: dict[nn.Module, list[tuple[DepthIdx, bool]]] = {}
        self.__dict__["_hook"] = _hook_for(self._owner)
        self.__dict__["_modules_seen"] = tuple(dict.fromkeys(module for _, module in self._rows))
        self.__dict__["_first_param"] = next(iter(net.parameters()), None)
        self.record()
        # compiled once, after the hooks: later calls run the compiled graph with them
        self.__dict__["_call"] = torch.compile(net) if compile else net

    # -- layers -----------------------------------------------------------------------------
    @property
    def net(self) -> nn.Module:
        """The wrapped network."""
        return self._net

    @property
    def layers(self) -> tuple[DepthIdx, ...]:
        """Every selectable layer identifier, in call order."""
        return tuple(depth_idx for depth_idx, _ in self._rows)

    @property
    def layer_names(self) -> dict[DepthIdx, str]:
        """Qualified module name of every layer (``""`` for the whole network)."""
        names = module_names(self.__dict__["_inner"])
        return {depth_idx: names.get(module, "?") for depth_idx, module in self._rows}

    def _resolve(self, spec: object) -> object:
        """Map a module name to its (first) ``(depth, idx)``; other specs are kept."""
        if isinstance(spec, str):
            for depth_idx, name in self.layer_names.items():
                if name == spec:
                    return depth_idx
        return spec

    def record(self, *depth_idxs: LayerSpec, token: TokenReduction | None = None) -> None:
        """Choose the layers to record (``record()`` clears the selection).

        Each layer is a ``(depth, idx)`` pair from the summary table, or a module name.
        Order and duplicates are ignored. Unknown layers raise ``ValueError`` and keep the
        previous selection.

        Args:
            token: extension for token sequences: a recorded ``(n, T, d)`` activation is
                kept as its first token (``"cls"``) or its mean over the tokens (``"mean"``,
                over the non-padded ones when the call has an ``attention_mask``), so that
                feature scores see one vector per sample. The network itself is unchanged.
        """
        check_token(token)
        requested = {self._resolve(spec) for spec in depth_idxs}
        seqs: dict[nn.Module, list[tuple[DepthIdx, bool]]] = {}
        found: set[object] = set()
        for depth_idx, module in self._rows:
            wanted = depth_idx in requested
            if wanted:
                found.add(depth_idx)
            seqs.setdefault(module, []).append((depth_idx, wanted))
        missing = requested - found
        if missing:
            hint = ""
            if len(depth_idxs) == 2 and all(type(arg) is int for arg in depth_idxs):
                hint = f"Did you mean `rnet.record({depth_idxs})`? "
            msg = f"Following layers not found: {missing}. {hint}Operation cancelled"
            raise ValueError(msg)
        self._record_seqs = seqs
        self._recording = tuple(sorted(found))  # type: ignore[arg-type]
        self.__dict__["_tokens"] = {} if token is None else dict.fromkeys(self._recording, token)
        self._tail = None
        self._sync_hooks()

    def _sync_hooks(self) -> None:
        """Hook exactly the modules that are recorded or tapped (a hook on any other module
        would only cost time: torch's slow call path on every call of it)."""
        hooks: dict[nn.Module, RemovableHandle] = self.__dict__["_hooks"]
        if not self.__dict__["_hooking"]:
            return
        wanted = {
            module for module, seq in self._record_seqs.items() if any(w for _, w in seq)
        } | set(self._taps)
        for module in [m for m in hooks if m not in wanted]:
            hooks.pop(module).remove()
        for module in self.__dict__["_modules_seen"]:
            if module in wanted and module not in hooks:
                hooks[module] = module.register_forward_hook(self.__dict__["_hook"])

    @property
    def recording(self) -> tuple[DepthIdx, ...]:
        """Recorded layer identifiers, sorted."""
        return self._recording

    @property
    def recorded_modules(self) -> dict[DepthIdx, nn.Module]:
        """``{depth_idx: module}`` of the recorded layers, in summary order."""
        recorded = set(self._recording)
        return {depth_idx: module for depth_idx, module in self._rows if depth_idx in recorded}

    @property
    def recorded_params(self) -> dict[str, nn.Parameter]:
        """Parameters (named as in ``self.named_parameters()``) of the recorded modules."""
        owned = {
            id(param) for module in self.recorded_modules.values() for param in module.parameters()
        }
        return {name: param for name, param in self.named_parameters() if id(param) in owned}

    @property
    def activations(self) -> Mapping[DepthIdx, Any]:
        """Read-only activations of the latest forward pass *in the current thread* (or
        asyncio task), in firing order; empty before any. Inside a call (e.g. in a
        post-processor), that call's activations so far. Each call's activations belong to
        that call (see :meth:`capture`), so concurrent calls never see each other's."""
        capture = active(self._owner) or last_capture(self._owner)  # a running call: so far
        return _EMPTY if capture is None else capture.view()

    @property
    def _activations(self) -> dict[DepthIdx, Any]:
        """The reference's private name of :attr:`activations` (its tests assign it)."""
        return dict(self.activations)

    @_activations.setter
    def _activations(self, value: Mapping[DepthIdx, Any]) -> None:
        """Replace the activations of this thread's *running* call (e.g. from one of its
        post-processors); outside a call, nothing changes (no state on the recorder)."""
        capture = active(self._owner)
        if capture is not None:
            capture.activations = dict(value)

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        *args: Any,
        activation_postproc: Postprocessor | Sequence[Postprocessor] | None = None,
        dont_record: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Call the wrapped network and record the chosen layers.

        Args:
            *args, **kwargs: passed to the network.
            activation_postproc: a callable (applied to every recorded layer) or a list of
                callables (consumed in the order recorded layers fire), applied after
                recording; a returned tensor replaces the module output.
            dont_record: skip recording (post-processing still applies).
        """
        return self.capture(
            *args, activation_postproc=activation_postproc, dont_record=dont_record, **kwargs
        ).out

    def capture(
        self,
        *args: Any,
        activation_postproc: Postprocessor | Sequence[Postprocessor] | None = None,
        dont_record: bool = False,
        **kwargs: Any,
    ) -> Capture:
        """Like :meth:`forward`, but return the call's :class:`Capture`: its output
        (``.out``), recorded activations (``.activations``) and tapped inputs. The capture
        belongs to this call alone; it is also the current thread's :attr:`activations`."""
        owner = self._owner
        if activation_postproc is None and current_shared() is not None:
            shared = usable_shared(
                self._net, args, kwargs, self._rows_key, self._recording, self._taps
            )
            if shared is not None:
                capture = Capture(owner, self._record_seqs, self._taps)
                if not dont_record:
                    recording = set(self._recording)
                    capture.activations = {
                        d: a for d, a in shared.activations.items() if d in recording
                    }
                capture.tapped = {module: shared.tapped[module] for module in self._taps}
                capture.out = shared.out
                remember(capture)
                return capture
        state = self.__dict__
        if state["_keyword_inputs"] and len(args) == 1 and not kwargs:
            batch = args[0]
            if isinstance(batch, Mapping):  # a dict batch: the network is called with **batch
                args, kwargs = (), dict(batch)
            elif state["_input_key"] is not None:
                args, kwargs = (), {state["_input_key"]: batch}
        capture = Capture(
            owner,
            self._record_seqs,
            self._taps,
            activation_postproc,
            dont_record,
            len(self._recording),
        )
        tokens = state["_tokens"]
        if tokens:
            capture.tokens = tokens
            capture.mask = kwargs.get("attention_mask")
        try:
            if state["_hooks"] or activation_postproc is not None:
                with running(capture):  # the hooks find this call through it
                    raw = state["_call"](*args, **kwargs)
            else:  # no hook of this recorder can fire: nothing to find
                raw = state["_call"](*args, **kwargs)
            output = state["_output"]
            capture.out = (
                raw if output is None and type(raw) is Tensor else read_output(raw, output)
            )
            if not dont_record and len(capture.activations) != len(self._recording):
                diff = sorted(set(self._recording) - set(capture.activations))
                msg = (
                    f"Missing {diff} activations. This may be due to dynamic control flow, for "
                    "which functionality is NOT GUARANTEED!"
                )
                raise RuntimeError(msg)
        except BaseException:
            remember(Capture(owner, {}, {}))  # a failed call leaves no activations
            raise
        remember(capture)
        return capture

    def _plain_call(self, inputs: Any) -> Any:
        """The network's logits for ``inputs`` (a tensor or dict batch), recording nothing:
        the uncompiled network, called as the recorder calls it."""
        key = self.__dict__["_input_key"]
        if self._keyword_inputs and isinstance(inputs, Mapping):
            raw = self._inner(**inputs)
        else:
            raw = self._inner(inputs) if key is None else self._inner(**{key: inputs})
        return read_output(raw, self._output)

    def shaped_forward(
        self,
        inputs: Tensor,
        activations: Sequence[Tensor],
        activation_postproc: Postprocessor | Sequence[Postprocessor],
    ) -> Any:
        """``self(inputs, activation_postproc=..., dont_record=True)``, recomputing only the
        part of the network downstream of the first recorded layer when possible.

        ``activations`` must be the recorded activations of ``inputs`` (e.g. from the
        forward that computed the plain logits). When the network can be split after the
        first recorded layer (see :class:`scio.recorder.tail.Tail`) only that tail is rerun;
        otherwise (dynamic control flow, skip connections around the layer, ...) a second
        full forward is run, with the reason in a debug log.
        """
        from scio.recorder.tail import Tail

        if self._tail is None:
            self._tail = Tail(self)
        return self._tail.run(inputs, tuple(activations), activation_postproc)

    # -- misc -------------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        """Detach every hook from the wrapped network (the recorder stops recording)."""
        self.__dict__["_hooking"] = False
        hooks = self.__dict__["_hooks"]
        for handle in hooks.values():
            handle.remove()
        hooks.clear()

    def __del__(self) -> None:
        for handle in self.__dict__.get("_hooks", {}).values():
            handle.remove()

    def __repr__(self) -> str:
        table = repr(self.summary)
        rule = "=" * len(table.split("\n", 1)[0])
        current = ", ".join(f"{d}-{i}" for d, i in self._recording) or "None"
        return (
            f"Recorder instance for the following network\n{table}\n"
            f"Currently recording: {current}\n{rule}"
        )
