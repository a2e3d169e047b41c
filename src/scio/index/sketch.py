"""Mergeable quantile summaries with a certified rank error, for bounded-memory thresholds.

A :class:`QuantileSummary` of ``n`` values keeps a sorted subset of them, each with bounds
``rmin ≤ rank ≤ rmax`` on its (1-based) rank among all ``n`` values (Greenwald & Khanna,
"Space-efficient online computation of quantile summaries", SIGMOD 2001; the combine rule
of their "Power-conserving computation of order-statistics over sensor networks", PODS
2004). Two summaries of disjoint data **combine** into a summary of the union (the bounds
add up), and a summary can be **pruned** to ``s + 1`` elements. Answering rank ``r`` picks
the stored element minimising ``e = max(r - rmin, rmax - r)``; ``e`` is returned with the
value, so every answer carries its own certified rank error.

Error budget. An exact block of ``m`` values pruned to ``s + 1`` elements answers within
``⌈(m - 1) / (2s)⌉ + 1``; combining blocks adds the errors, so ``k`` blocks of ``m_i``
values answer within ``Σ_i (m_i / (2s) + 1) ≤ n / (2s) + k``. With the defaults
(:data:`SUMMARY_SIZE` ``s = 2**14``, blocks of :data:`EXACT_BUDGET` ``= 2**26`` values, so
``k ≤ n / 2**26 + 1``) the error is at most ``3.1e-5 · n + k``, within the documented
:data:`RANK_ERROR` ``= 1e-4 · n`` (a warning is emitted by the callers otherwise).

Values are kept in their own dtype (the selection is exact: a returned value is one of the
inputs); NaNs sort last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from scio.utils.state import CalibState

__all__ = [
    "EXACT_BUDGET",
    "RANK_ERROR",
    "SUMMARY_SIZE",
    "QuantileSummary",
    "append_summary",
    "combine_all",
    "kept_numel",
    "pop_parts",
    "read_summaries",
    "summary_rank",
    "threshold",
]

#: Number of values kept exactly (per threshold set and rank) before compressing them into a
#: summary: ``2**26`` values, 256 MiB in float32. Below it, thresholds are exact.
EXACT_BUDGET = 2**26
#: Points kept per compressed block (``s``): each block answers within ``m / (2s) + 1`` ranks.
SUMMARY_SIZE = 2**14
#: Documented bound of the relative rank error of sketched thresholds.
RANK_ERROR = 1e-4


@dataclass(frozen=True)
class QuantileSummary:
    """Sorted stored values with 1-based rank bounds among the ``n`` summarised values."""

    values: Tensor
    rmin: Tensor
    rmax: Tensor
    n: int

    @classmethod
    def exact(cls, values: Tensor) -> QuantileSummary:
        """Summary keeping every value (``rmin = rmax = rank``)."""
        flat = values.detach().reshape(-1).sort().values
        ranks = torch.arange(1, len(flat) + 1, device=flat.device)
        return cls(flat, ranks, ranks.clone(), len(flat))

    @classmethod
    def compressed(cls, values: Tensor, size: int) -> QuantileSummary:
        """``exact(values).prune(size)`` without the full rank tensors: the values at the
        evenly spaced ranks ``1 + round(j · (m - 1) / size)`` of the sorted values (exact
        ranks). CPU values are sorted by numpy, which allocates no index tensor."""
        if size < 1:
            msg = f"`size` must be a positive integer (got {size})"
            raise ValueError(msg)
        flat = values.detach().reshape(-1)
        m = len(flat)
        if m <= size + 1:
            return cls.exact(flat)
        if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
            ordered = torch.from_numpy(np.sort(flat.numpy(), kind="stable"))
        else:
            ordered = flat.sort().values
        steps = torch.arange(size + 1, dtype=torch.float64, device=flat.device)
        positions = torch.unique((steps * (m - 1) / size).round().to(torch.int64))
        ranks = positions + 1
        return cls(ordered[positions], ranks, ranks.clone(), m)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def is_exact(self) -> bool:
        """Whether every summarised value is stored (answers are exact)."""
        return len(self.values) == self.n

    def combine(self, other: QuantileSummary) -> QuantileSummary:
        """Summary of the union; ties are ordered ``self`` first (keeps the bounds valid)."""
        a, b = self, other.to(self.values.device)
        if not len(a):
            return b
        if not len(b):
            return a
        below_b = torch.searchsorted(b.values, a.values, right=False)  # stored b < a
        below_a = torch.searchsorted(a.values, b.values, right=True)  # stored a <= b
        rmin = torch.cat([a.rmin + _lower(b, below_b), b.rmin + _lower(a, below_a)])
        rmax = torch.cat([a.rmax + _upper(b, below_b), b.rmax + _upper(a, below_a)])
        values = torch.cat([a.values, b.values])
        order = torch.argsort(values, stable=True)
        return QuantileSummary(values[order], rmin[order], rmax[order], a.n + b.n)

    def prune(self, size: int) -> QuantileSummary:
        """Keep at most ``size + 1`` stored values, the best answers to evenly spaced ranks."""
        if size < 1:
            msg = f"`size` must be a positive integer (got {size})"
            raise ValueError(msg)
        if len(self) <= size + 1:
            return self
        steps = torch.arange(size + 1, dtype=torch.float64, device=self.values.device)
        ranks = (1 + steps * (self.n - 1) / size).round()
        keep = torch.unique(self._best(ranks)[0])
        return QuantileSummary(self.values[keep], self.rmin[keep], self.rmax[keep], self.n)

    def _best(self, ranks: Tensor) -> tuple[Tensor, Tensor]:
        """Index of the stored value answering each rank, and its certified error."""
        mid = (self.rmin + self.rmax).to(torch.float64) / 2
        right = torch.searchsorted(mid, ranks.to(torch.float64))
        candidates = torch.stack([(right - 1).clamp(min=0), right.clamp(max=len(self) - 1)])
        errors = torch.maximum(ranks - self.rmin[candidates], self.rmax[candidates] - ranks)
        pick = errors.argmin(dim=0, keepdim=True)
        return candidates.gather(0, pick)[0], errors.gather(0, pick)[0]

    def query(self, rank: int) -> tuple[Tensor, int]:
        """Value answering the 1-based ``rank`` and its certified rank error."""
        if not 1 <= rank <= self.n:
            msg = f"`rank` must lie in [1, {self.n}] (got {rank})"
            raise ValueError(msg)
        ranks = torch.tensor([float(rank)], dtype=torch.float64, device=self.values.device)
        index, error = self._best(ranks)
        return self.values[index[0]], int(error[0])

    def quantile(
        self, q: float, interpolation: Literal["higher", "lower"] = "higher"
    ) -> tuple[Tensor, int]:
        """``q``-quantile (``torch.quantile``'s ``higher``/``lower`` rule) and its error."""
        return self.query(summary_rank(q, self.n, interpolation))

    def to(self, device: torch.device) -> QuantileSummary:
        """The summary on ``device``."""
        if self.values.device == device:
            return self
        return QuantileSummary(
            self.values.to(device), self.rmin.to(device), self.rmax.to(device), self.n
        )


def _lower(other: QuantileSummary, below: Tensor) -> Tensor:
    """Lower bound on the number of ``other``'s values before each element (pred's rmin)."""
    return torch.cat([other.rmin.new_zeros(1), other.rmin])[below]


def _upper(other: QuantileSummary, below: Tensor) -> Tensor:
    """Upper bound on the number of ``other``'s values before each element (succ's rmax-1)."""
    return torch.cat([other.rmax - 1, other.rmax.new_full((1,), other.n)])[below]


def summary_rank(q: float, n: int, interpolation: Literal["higher", "lower"]) -> int:
    """1-based rank selected by ``torch.quantile(x, q, interpolation)`` on ``n`` values."""
    position = torch.tensor(float(q), dtype=torch.float64) * (n - 1)
    position = position.ceil() if interpolation == "higher" else position.floor()
    return int(position.clamp(0, n - 1)) + 1


def combine_all(summaries: Sequence[QuantileSummary]) -> QuantileSummary:
    """Combine summaries pairwise in a balanced tree (order-preserving for ties)."""
    if not summaries:
        msg = "`summaries` must hold at least one summary"
        raise ValueError(msg)
    level = list(summaries)
    while len(level) > 1:
        pairs = [level[i].combine(level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
    return level[0]


# -- storage in a CalibState (mergeable: concatenating parts concatenates block lists) ---------
def append_summary(state: CalibState, name: str, summary: QuantileSummary) -> None:
    """Store ``summary`` as one more block of the summaries named ``name``."""
    device = summary.values.device
    state.append(f"{name}.values", summary.values)
    state.append(f"{name}.rmin", summary.rmin)
    state.append(f"{name}.rmax", summary.rmax)
    state.append(f"{name}.sizes", torch.tensor([len(summary)], device=device))
    state.append(f"{name}.counts", torch.tensor([summary.n], device=device))


def read_summaries(state: CalibState, name: str) -> list[QuantileSummary]:
    """Non-empty blocks stored under ``name`` (see :func:`append_summary`)."""
    sizes = state.cat(f"{name}.sizes").tolist()
    counts = state.cat(f"{name}.counts").tolist()
    columns = [state.cat(f"{name}.{field}").split(sizes) for field in ("values", "rmin", "rmax")]
    return [
        QuantileSummary(values, rmin, rmax, int(count))
        for values, rmin, rmax, count in zip(*columns, counts, strict=True)
        if count
    ]


def pop_parts(state: CalibState, name: str) -> Tensor | None:
    """Remove the tensors appended under ``name`` and return their concatenation."""
    parts = state.pop(name)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def kept_numel(state: CalibState, name: str) -> int:
    """Number of elements appended under ``name`` (0 if none)."""
    return sum(part.numel() for part in state.parts(name))


def threshold(
    state: CalibState, name: str, sketch: str, q: float, interpolation: Literal["higher", "lower"]
) -> tuple[Tensor, int, int]:
    """``q``-quantile of the values kept under ``name`` and summarised under ``sketch``.

    Returns ``(value, certified rank error, n)``; exact (error 0, and the value of
    ``torch.quantile`` for that interpolation) when no block was compressed.
    """
    blocks = read_summaries(state, sketch) if f"{sketch}.sizes" in state else []
    if name in state and kept_numel(state, name):  # the leftover: one more (pruned) block
        blocks.append(QuantileSummary.compressed(state.cat(name), SUMMARY_SIZE))
    summary = combine_all(blocks)
    value, error = summary.quantile(q, interpolation)
    return value, error, summary.n
