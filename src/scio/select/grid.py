"""Hyper-parameter grids: expand them in a fixed order and build one score per grid point."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

from scio.scores import BaseScore

__all__ = ["Grid", "expand_grid", "make_candidates"]

S = TypeVar("S", bound=BaseScore)

#: ``{parameter: [values]}`` (every combination is searched) or a list of ``{parameter:
#: value}`` points.
Grid: TypeAlias = Mapping[str, Iterable[Any]] | Sequence[Mapping[str, Any]]


def expand_grid(grid: Grid, *, name: str = "grid") -> list[dict[str, Any]]:
    """The grid points, in grid order.

    Grid order: for a dict, :func:`itertools.product` over its keys in insertion order (the
    last key varies fastest), e.g. ``{"a": [1, 2], "b": [3, 4]}`` gives ``a=1,b=3``,
    ``a=1,b=4``, ``a=2,b=3``, ``a=2,b=4``; for a list of dicts, the list order. Ties between
    grid points are broken by this order (the first one wins).

    Raises:
        ValueError: an empty grid (``{}``, ``[]``, or a parameter with no value), a value
            list that is a string or a mapping, a list entry that is not a dict.
        TypeError: ``grid`` is neither a mapping nor a list of mappings.
    """
    if isinstance(grid, Mapping):
        if not grid:
            msg = f"`{name}` is empty ({{}}): give at least one parameter and its values"
            raise ValueError(msg)
        names, lists = [], []
        for param, values in grid.items():
            if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
                msg = (
                    f"`{name}[{param!r}]` must be a list of values to try (got {values!r}); "
                    f"write `{param!r}: [{values!r}]` for a single value"
                )
                raise ValueError(msg)
            values = list(values)
            if not values:
                msg = f"`{name}[{param!r}]` is an empty list: the grid has no point"
                raise ValueError(msg)
            names.append(str(param))
            lists.append(values)
        return [dict(zip(names, combo)) for combo in itertools.product(*lists)]
    if isinstance(grid, Sequence) and not isinstance(grid, str | bytes):
        if not grid:
            msg = f"`{name}` is an empty list: give at least one grid point (a dict)"
            raise ValueError(msg)
        points = []
        for i, point in enumerate(grid):
            if not isinstance(point, Mapping):
                msg = f"`{name}[{i}]` must be a dict of parameter values (got {point!r})"
                raise ValueError(msg)
            points.append({str(key): value for key, value in point.items()})
        return points
    msg = (
        f"`{name}` must be a dict of parameter -> list of values, or a list of dicts (got "
        f"{type(grid).__name__})"
    )
    raise TypeError(msg)


def check_names(score: BaseScore, points: Sequence[Mapping[str, Any]], *, name: str) -> None:
    """Raise ``ValueError`` if a grid point names a parameter ``score`` does not have."""
    valid = type(score)._param_names
    unknown = sorted({param for point in points for param in point if param not in valid})
    if unknown:
        msg = (
            f"`{name}` names unknown parameter(s) {unknown} of {type(score).__name__}; its "
            f"parameters are {list(valid)}"
        )
        raise ValueError(msg)


def make_candidates(
    score: S, points: Sequence[Mapping[str, Any]], *, name: str = "grid"
) -> list[S]:
    """One new unfitted score per grid point: ``score``'s parameters overridden by the point.

    ``score`` itself is never modified; parameter values are deep-copied, so candidates
    share nothing. Invalid values raise here (the score's own checks), before any forward.
    """
    check_names(score, points, name=name)
    # the parameters set on ``score`` (class defaults stay defaults)
    base = {key: score.__dict__[key] for key in type(score)._param_names if key in score.__dict__}
    candidates = []
    for point in points:
        params = copy.deepcopy({**base, **point})
        candidates.append(type(score)(**params))
    return candidates
