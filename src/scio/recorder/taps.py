"""Input taps of a :class:`~scio.recorder.Recorder` (internal: the heads of head-based scores).

A tapped module's (first) input and its output are kept at every call of it during the
recorder's forwards, in the call's own :class:`~scio.recorder.capture.Capture` (never on
the recorder), so that a score reads the input of a network's head without recording it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from torch import nn

from scio.recorder.capture import DepthIdx, last_capture

__all__ = ["InputTaps"]


class InputTaps:
    """The tap methods of :class:`~scio.recorder.Recorder` (a mixin: it reads the
    recorder's layer rows, tapped modules and owner token, and re-syncs its hooks)."""

    _owner: object
    _rows: tuple[tuple[DepthIdx, nn.Module], ...]
    _taps: dict[nn.Module, None]

    def _sync_hooks(self) -> None:  # pragma: no cover - the recorder's
        raise NotImplementedError

    def _tap(self, *modules: nn.Module) -> None:
        """Also keep the (first) input of ``modules`` at every forward (see ``_tapped``)."""
        known = {module for _, module in self._rows}
        for module in modules:
            if module not in known:
                msg = f"Cannot tap {type(module).__name__}: it is not a layer of the network"
                raise ValueError(msg)
            self._taps[module] = None
        self._sync_hooks()

    @property
    def _tapped_inputs(self) -> dict[nn.Module, Any]:
        """(First) input of each tapped module at its latest call in the latest forward of
        the current thread."""
        capture = last_capture(self._owner)
        return {} if capture is None else capture.tapped_inputs

    @property
    def _tapped_calls(self) -> Mapping[nn.Module, list[tuple[Any, Any]]]:
        """``(input, output)`` of every call of each tapped module in the latest forward of
        the current thread."""
        capture = last_capture(self._owner)
        return MappingProxyType({} if capture is None else capture.tapped)
