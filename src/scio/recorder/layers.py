"""Listing a network's layers: torchinfo's rows, ``(depth, idx)`` identifiers, module names.

One torchinfo summary forward lists one row per module *call*; the recorder identifies layers
by the rows' ``(depth, depth_index)`` pairs (the reference's identifiers) or by the module
names that ``named_modules()`` prints. The summary forward must leave the network exactly as
it was: every parameter's ``requires_grad`` and every module's mode are restored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import torch
import torchinfo
from torch import Tensor, nn
from torchinfo.layer_info import LayerInfo

__all__ = [
    "DEFAULT_SUMMARY_KWARGS",
    "Row",
    "check_static_flow",
    "get_layer_info_depth_idx",
    "lazy_func",
    "module_names",
    "rows_key",
    "summarize",
]

logger = logging.getLogger(__name__)

DepthIdx: TypeAlias = tuple[int, int]
Row: TypeAlias = tuple[DepthIdx, nn.Module]
_R = TypeVar("_R")

DEFAULT_SUMMARY_KWARGS: dict[str, Any] = {
    "col_names": ("input_size", "output_size", "num_params", "params_percent"),
    "depth": float("inf"),
    "row_settings": ("var_names", "depth"),
    "verbose": torchinfo.Verbosity.QUIET,
}


def get_layer_info_depth_idx(layer_info: LayerInfo) -> DepthIdx:
    """Return the ``(depth, depth_index)`` identifier of a torchinfo row."""
    if layer_info.depth_index is None:
        msg = f"Unexpected `None` depth_index for {layer_info}"
        raise ValueError(msg)
    return (layer_info.depth, layer_info.depth_index)


def lazy_func(ref: Callable[[], Callable[..., _R] | None]) -> Callable[..., _R | None]:
    """Return a function calling the referent of ``ref``, or returning ``None`` if it died."""

    def call(*args: Any, **kwargs: Any) -> _R | None:
        func = ref()
        if func is None:
            return None
        return func(*args, **kwargs)

    return call


def rows_key(rows: Sequence[Row]) -> tuple[tuple[DepthIdx, int], ...]:
    """A hashable fingerprint of a layer listing (identifiers and module identities)."""
    return tuple((depth_idx, id(module)) for depth_idx, module in rows)


def module_names(net: nn.Module) -> dict[nn.Module, str]:
    """The qualified name of every module of ``net`` (its first, for a shared module)."""
    names: dict[nn.Module, str] = {}
    for name, module in net.named_modules():
        names.setdefault(module, name)
    return names


def check_static_flow(net: nn.Module) -> None:
    """Raise ``RuntimeError`` if ``torch.fx`` finds data-dependent control flow in ``net``.

    A network the tracer cannot read at all (Python constructs it does not support, as in
    Hugging Face models) cannot be proven static or dynamic: it is accepted, and every
    forward then checks that each recorded layer fired as listed.
    """
    try:
        torch.fx.symbolic_trace(net)
    except torch.fx.proxy.TraceError as exc:
        msg = (
            "The control flow of the input network is not static (see traceback). Use "
            "`Recorder` at your own risk with `force_static_flow=False`. See "
            "`help(Recorder)` for a detailed warning"
        )
        raise RuntimeError(msg) from exc
    except Exception as exc:  # the tracer cannot read this network's code
        logger.debug("torch.fx cannot trace %s (%s): static flow not proven", type(net), exc)


def summarize(net: nn.Module, kwargs: Mapping[str, Any]) -> torchinfo.ModelStatistics:
    """torchinfo's summary of ``net`` (one forward), leaving every flag of ``net`` as it was."""
    grad_flags = {name: p.requires_grad for name, p in net.named_parameters()}
    modes = {module: module.training for module in net.modules()}
    try:
        return torchinfo.summary(net, **kwargs)
    except RuntimeError as exc:
        given = kwargs.get("input_size")
        if given is None:
            data = kwargs.get("input_data")
            if isinstance(data, Tensor):
                given = tuple(data.shape)
            elif isinstance(data, Mapping):
                given = {k: tuple(getattr(v, "shape", ())) for k, v in data.items()}
            else:
                given = type(data).__name__
        msg = (
            f"The network failed to run on the Recorder's example input ({given}): pass "
            "`input_data` (e.g. one calibration sample, `data[:1]`, or a dict batch for a "
            "model called as `model(**batch)`) or `input_size` with the shape the network "
            "expects, batch dimension included"
        )
        raise RuntimeError(msg) from exc
    finally:
        torchinfo.torchinfo.clear_cached_forward_pass()
        # torchinfo restores only the root's mode; leave every flag as it was
        for name, param in net.named_parameters():
            param.requires_grad_(grad_flags[name])
        for module, training in modes.items():
            module.training = training
