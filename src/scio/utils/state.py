"""The mergeable calibration state of streaming scores (pure tensors, no network)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CalibState"]


class CalibState:
    """Mergeable calibration state (in the spirit of torchmetrics' update/merge/compute).

    ``append`` stores tensors to be concatenated along dim 0 (features, logits, labels);
    ``add`` accumulates running sums (counts, moments). Two states built from disjoint
    parts of a calibration set :meth:`merge` into the state of the whole set, which is
    what makes streaming and distributed calibration possible.
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[Tensor]] = {}
        self._sums: dict[str, Tensor] = {}

    def append(self, name: str, value: Tensor) -> None:
        """Store ``value`` to be concatenated with the other parts named ``name``."""
        self._parts.setdefault(name, []).append(value.detach())

    def add(self, name: str, value: Tensor) -> None:
        """Add ``value`` to the running sum named ``name``."""
        value = value.detach()
        if name in self._sums:
            self._sums[name] = self._sums[name] + value
        else:
            self._sums[name] = value.clone()

    def cat(self, name: str) -> Tensor:
        """Concatenation of every part appended under ``name``."""
        parts = self._parts[name]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def sum(self, name: str) -> Tensor:
        """The running sum named ``name``."""
        return self._sums[name]

    def parts(self, name: str) -> list[Tensor]:
        """The parts appended under ``name``, in order (the state's own list, so a score may
        thin them in place; empty if none)."""
        return self._parts.get(name, [])

    def pop(self, name: str) -> list[Tensor]:
        """Remove the parts appended under ``name`` and return them (empty if none)."""
        return self._parts.pop(name, [])

    def n_rows(self, name: str) -> int:
        """Total first-dimension length of the parts appended under ``name``."""
        return sum(len(part) for part in self.parts(name))

    def __contains__(self, name: str) -> bool:
        return name in self._parts or name in self._sums

    def merge(self, other: CalibState) -> CalibState:
        """Merge ``other`` into this state (in place) and return it."""
        for name, parts in other._parts.items():
            self._parts.setdefault(name, []).extend(parts)
        for name, value in other._sums.items():
            self.add(name, value)
        return self
