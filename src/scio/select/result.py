"""Results of validated selection: a small sortable table and the outcome of :func:`tune`."""

from __future__ import annotations

import csv
import io
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np
import numpy.typing as npt

from scio.scores import BaseScoreClassif

__all__ = ["ResultTable", "TuneResult"]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


class ResultTable:
    """Rows (dicts) of a validated search: the parameters of each grid point and its
    validation metric. Pandas-free: iterate it, index it, sort it, write it as CSV.

    Args:
        rows: one dict per grid point, in grid order.
        metric: the column holding the validation metric.
        higher_is_better: the metric's direction (used by :meth:`sorted`).
    """

    def __init__(
        self, rows: Sequence[Mapping[str, Any]], metric: str, *, higher_is_better: bool = True
    ) -> None:
        self._rows = tuple(dict(row) for row in rows)
        self.metric = metric
        self.higher_is_better = higher_is_better

    @property
    def columns(self) -> list[str]:
        """Every column name, in first-seen order, the metric last (a row may lack some
        columns: empty cells)."""
        names: dict[str, None] = {}
        for row in self._rows:
            names.update(dict.fromkeys(row))
        names.pop(self.metric, None)
        return [*names, self.metric]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """A copy of the rows."""
        return [dict(row) for row in self._rows]

    def column(self, name: str) -> list[Any]:
        """The values of one column (``None`` where a row lacks it)."""
        return [row.get(name) for row in self._rows]

    def values(self) -> npt.NDArray[np.float64]:
        """The metric column as a float64 array."""
        return np.array([row[self.metric] for row in self._rows], dtype=np.float64)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._rows[index])

    def sorted(self, by: str | None = None, *, descending: bool | None = None) -> ResultTable:
        """A new table sorted by column ``by`` (default: the metric, best first; NaN and
        missing values last). The sort is stable: equal values keep grid order."""
        by = self.metric if by is None else by
        if descending is None:
            descending = self.higher_is_better if by == self.metric else False

        def missing(value: Any) -> bool:
            return value is None or (isinstance(value, float) and math.isnan(value))

        present = [row for row in self._rows if not missing(row.get(by))]
        numeric = all(
            isinstance(row[by], numbers.Real) and not isinstance(row[by], bool) for row in present
        )
        # ``sorted`` is stable also with ``reverse=True``: equal values keep grid order
        rows = sorted(present, key=lambda r: r[by] if numeric else str(r[by]), reverse=descending)
        rows += [row for row in self._rows if missing(row.get(by))]
        return ResultTable(rows, self.metric, higher_is_better=self.higher_is_better)

    def to_csv(self, path: str | PathLike[str] | None = None) -> str:
        """The table as CSV text (header = :attr:`columns`); also written to ``path`` if
        given. Floats are written exactly (``repr``), ``None`` as an empty cell."""
        buffer = io.StringIO()
        columns = self.columns
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in self._rows:
            writer.writerow([_cell(row.get(name)) for name in columns])
        text = buffer.getvalue()
        if path is not None:
            with open(path, "w", newline="") as handle:
                handle.write(text)
        return text

    def __str__(self) -> str:
        columns = self.columns
        cells = [[_cell(row.get(name)) for name in columns] for row in self._rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self) -> str:
        return f"ResultTable({len(self)} rows, metric={self.metric!r})"


@dataclass(frozen=True, eq=False)
class TuneResult:
    """The outcome of :func:`scio.select.tune`.

    Attributes:
        score: a score fitted on the calibration data with :attr:`best_params` (ready for
            inference).
        best_params: the parameters of the best grid point (only those the grid sets).
        table: one row per grid point, in grid order: ``point`` (its index), the grid's
            parameters, and the validation metric (column named :attr:`metric`).
        metric: the metric's name (``"auroc"``, ``"fpr@95"``, ``"aupr"``).
        higher_is_better: the metric's direction.
        best_index: index of the best grid point (the first one on ties).
        val_confidences: the best score's confidences on the validation InD and OoD data
            (float64 arrays; the conformity of the predicted class).
    """

    score: BaseScoreClassif
    best_params: dict[str, Any]
    table: ResultTable
    metric: str
    higher_is_better: bool
    best_index: int
    val_confidences: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] = field(repr=False)

    @property
    def best_value(self) -> float:
        """The validation metric of the best grid point."""
        return float(self.table[self.best_index][self.metric])

    def __repr__(self) -> str:
        return (
            f"TuneResult(score={self.score!s}, best_params={self.best_params!r}, "
            f"{self.metric}={self.best_value:.4f}, {len(self.table)} grid points)"
        )
