"""Temporary changes to a shared network (eval mode, frozen parameters), safe from many
threads at once.

A score's forwards must not use dropout or update batch-norm statistics, and its input
gradients must not build parameter gradients, whatever the user left the network in; and
the user's flags must come back exactly as they were. When several threads score with one
network at once, the first call switches it and the last one to leave restores the flags, so
no call ever runs unswitched and no call restores the flags under another's feet.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["SharedSwitch", "eval_mode", "frozen_parameters"]


class SharedSwitch:
    """A change to an object applied by the first of its concurrent users, undone by the
    last (reference counted under a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[int, list[Any]] = {}  # id(obj) -> [users, saved state]

    @contextmanager
    def __call__(
        self, obj: object, apply: Callable[[], Any], restore: Callable[[Any], None]
    ) -> Iterator[None]:
        """Inside the context, ``obj`` is switched: ``apply()`` switches it and returns the
        state to give ``restore`` (``None``: nothing to switch)."""
        key = id(obj)
        with self._lock:
            entry = self._active.get(key)
            if entry is not None:
                entry[0] += 1
            else:
                saved = apply()
                if saved is not None:
                    entry = self._active[key] = [1, saved]
        if entry is None:
            yield
            return
        try:
            yield
        finally:
            with self._lock:
                entry[0] -= 1
                if not entry[0]:
                    del self._active[key]
                    restore(entry[1])


_EVAL = SharedSwitch()
_FROZEN = SharedSwitch()


def eval_mode(net: nn.Module, modules: Sequence[nn.Module] | None = None) -> Any:
    """Context: ``net`` in eval mode, with a warning if it was training; every module's flag
    is restored on exit. Nothing changes when none of ``modules`` (default: every module of
    ``net``) is training."""

    def apply() -> dict[nn.Module, bool] | None:
        watched = net.modules() if modules is None else modules
        if not any(module.training for module in watched):
            return None
        modes = {module: module.training for module in net.modules()}
        warnings.warn(
            "The network is in training mode; scio runs it in eval mode for the score's "
            "forward passes (dropout off, batch-norm statistics frozen) and restores the mode "
            "afterwards. Call `net.eval()` to silence this warning.",
            UserWarning,
            stacklevel=5,
        )
        net.eval()
        return modes

    def restore(modes: dict[nn.Module, bool]) -> None:
        for module, training in modes.items():
            module.training = training

    return _EVAL(net, apply, restore)


def frozen_parameters(net: nn.Module) -> Any:
    """Context: no parameter of ``net`` requires grad; on exit exactly those that did get
    their flag back (also on error). Gradients w.r.t. the inputs are unchanged; ``.grad``
    attributes are never touched."""

    def apply() -> list[nn.Parameter] | None:
        thawed = [param for param in net.parameters() if param.requires_grad]
        for param in thawed:
            param.requires_grad_(False)
        return thawed or None

    def restore(thawed: list[nn.Parameter]) -> None:
        for param in thawed:
            param.requires_grad_(True)

    return _FROZEN(net, apply, restore)
