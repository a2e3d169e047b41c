"""The classifier head: discovery of the final linear layer and access to its input.

ViM, DICE, fDBD, NCI, NNGuide, ASH, SCALE and SHE read the penultimate features *and* the
final linear layer ``z = W h + b``. The head is found from the network itself: the
``nn.Linear`` whose output is the network output, called after the recorded layer. Discovery
runs one probe forward with plain forward hooks, in call order, so it needs no ``torch.fx``
trace and works on transformer classifiers (``head(x[:, 0])``) as on CNNs; a module name
overrides it (``head="classifier"``).

The features ``h`` are the head's *input*, captured by the recorder during the forward
that computes the logits (an input tap), so a head-based score costs one forward at
inference and shares the calibration forward of :func:`scio.scores.fit_jointly`.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from scio.recorder.modes import eval_mode

if TYPE_CHECKING:
    from scio.recorder import Recorder

__all__ = ["find_head"]

#: The discovery forward running in this context (its hooks ignore every other call).
_PROBING: ContextVar[object] = ContextVar("scio_head_probe", default=None)


def _module_names(net: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, module in net.named_modules():
        names.setdefault(module, name)
    return names


def _recorded_description(rnet: Recorder) -> str:
    names = rnet.layer_names
    return ", ".join(
        f"{d}-{i} ({names.get((d, i), '?') or 'the network'!r})" for d, i in rnet.recording
    )


def find_head(rnet: Recorder, probe: Tensor, head: str | None = None) -> tuple[str, nn.Linear]:
    """Return ``(name, module)`` of the linear head following ``rnet``'s recorded layers.

    Args:
        rnet: a recorder recording (at least) one layer before the head.
        probe: a few inputs for one discovery forward (no gradient, eval mode).
        head: the head's module name, to skip discovery.

    Raises:
        ValueError: nothing is recorded, the named module is not an ``nn.Linear`` called
            once after the recorded layers, or no such linear layer produces the output.
    """
    net = rnet._inner
    if not rnet.recording:
        msg = (
            "The recorder records no layer: head-based scores need the layer before the "
            "classifier head, e.g. `rnet.record(...)` with the penultimate layer"
        )
        raise ValueError(msg)
    names = _module_names(net)
    recorded = set(rnet.recorded_modules.values())
    events: list[tuple[nn.Module, Any]] = []
    probe_call = object()

    def hook(module: nn.Module, _args: Any, output: Any) -> None:
        if _PROBING.get() is probe_call:  # not another thread's call of the same network
            events.append((module, output))

    watched = {m for m in net.modules() if isinstance(m, nn.Linear)} | recorded
    handles = [module.register_forward_hook(hook) for module in watched]
    token = _PROBING.set(probe_call)
    try:
        with torch.no_grad(), eval_mode(net):
            out = rnet._plain_call(probe)
    finally:
        _PROBING.reset(token)
        for handle in handles:
            handle.remove()
    after = max(i for i, (module, _) in enumerate(events) if module in recorded) + 1
    later = events[after:]
    where = _recorded_description(rnet)
    if head is not None:
        try:
            module = net.get_submodule(head)
        except AttributeError:
            msg = f"`head`={head!r} is not a module of the network"
            raise ValueError(msg) from None
        if not isinstance(module, nn.Linear):
            msg = f"`head`={head!r} must name an nn.Linear (got {type(module).__name__})"
            raise ValueError(msg)
        if not any(m is module for m, _ in later):
            msg = f"`head`={head!r} is not called after the recorded layer {where}"
            raise ValueError(msg)
    else:
        candidates = [
            m
            for m, output in later
            if isinstance(m, nn.Linear)
            and isinstance(out, Tensor)
            and isinstance(output, Tensor)
            and (output is out or (output.shape == out.shape and torch.equal(output, out)))
        ]
        if not candidates:
            msg = (
                f"No linear head follows the recorded layer {where}: head-based scores need "
                "an nn.Linear whose output is the network output after it. Record an earlier "
                "layer, or name the head with `head=<module name>`"
            )
            raise ValueError(msg)
        module = candidates[-1]
    n_calls = sum(m is module for m, _ in events)
    if n_calls != 1:
        msg = f"The head {names[module]!r} is called {n_calls} times per forward (expected once)"
        raise ValueError(msg)
    return names[module], module
