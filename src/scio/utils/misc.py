"""Small shared helpers: ``check``, ``format_time`` and the :class:`ScoreTimer`."""

from __future__ import annotations

import copy
import math
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter
from types import MappingProxyType
from typing import Any, NamedTuple

import rich
from rich.box import Box
from rich.highlighter import ReprHighlighter
from rich.table import Table

from scio.utils.enums import ScoreTimerOperation, ScoreTimerOperationLike

__all__ = [
    "HEAVY_HEAD_ROUNDED_BOTTOM",
    "ScoreTimer",
    "ScoreTimerStat",
    "check",
    "check_not_abstract",
    "format_time",
]

HEAVY_HEAD_ROUNDED_BOTTOM = Box("┏━┳┓\n┃ ┃┃\n┡━╇┩\n│ ││\n├─┼┤\n├─┼┤\n│ ││\n╰─┴╯\n")

_UNITS = ("s", "ms", "μs", "ns", "ps", "fs", "as")


def check(condition: object, message: str = "") -> None:
    """Raise ``AssertionError(message)`` when ``condition`` is falsy (never stripped by -O)."""
    if not condition:
        raise AssertionError(message)


def check_not_abstract(cls: type) -> None:
    """Raise the ``TypeError`` of instantiating an abstract class, worded as Python 3.12 and
    later word it on every version (Python 3.11 says "with abstract method(s) a, b")."""
    names = sorted(getattr(cls, "__abstractmethods__", ()))
    if names:
        plural = "s" if len(names) > 1 else ""
        msg = (
            f"Can't instantiate abstract class {cls.__name__} without an implementation for "
            f"abstract method{plural} " + ", ".join(f"'{name}'" for name in names)
        )
        raise TypeError(msg)


def format_time(duration: float, num_digits: int = 4) -> str:
    """Format a duration in seconds with ``num_digits`` significant digits.

    The unit (``s`` down to ``as``) is chosen so the integer part has 1 to 3 digits; a
    trailing ``.`` marks a value whose digits are all integral (``"1234. s"``). Durations of
    at least ``10**num_digits`` seconds are printed as rounded integers.
    """
    check(num_digits >= 3, "Display at least 3 digits")
    check(0 <= duration < 10 ** (num_digits + 1) - 0.5, "Duration out of bounds")
    if duration >= 10**num_digits:
        return f"{round(duration)} s"
    unit = 0
    while unit < len(_UNITS) - 1 and duration * 1000**unit < 1:
        unit += 1
    while True:
        n_int = len(str(int(duration * 1000**unit)))
        decimals = max(num_digits - n_int, 0)
        # Round an integer number of the last displayed digit (half-even, no float noise
        # from formatting): 0.12345 s -> 1234.5 -> 1234 -> "123.4 ms".
        mantissa = round(duration * 10 ** (3 * unit + decimals))
        if unit > 0 and mantissa >= 10 ** (3 + decimals):
            unit -= 1  # rounding overflowed into the next unit (e.g. 999.95 ms -> 1.000 s)
            continue
        break
    digits = str(mantissa).rjust(decimals + 1, "0")
    if decimals == 0:
        if len(digits) > num_digits:
            return f"{mantissa} s"
        return f"{digits}. {_UNITS[unit]}"
    return f"{digits[:-decimals]}.{digits[-decimals:]} {_UNITS[unit]}"


class ScoreTimerStat(NamedTuple):
    """One timed operation: what, on how many samples, how long, with which parameters."""

    op: ScoreTimerOperation
    n_samples: int
    duration: float
    params: MappingProxyType[str, Any]


def _snapshot(params: dict[str, Any]) -> MappingProxyType[str, Any]:
    snap = {}
    for key, value in params.items():
        try:
            snap[key] = copy.deepcopy(value)
        except Exception:  # un-copyable values are kept as they are
            snap[key] = value
    return MappingProxyType(snap)


def _reported_params(target: Any) -> dict[str, Any]:
    """Parameters of ``target`` for the reports: extension parameters (scio additions, see
    ``ParamClass._extension_params``) only when they differ from their default."""
    params = dict(target.params)
    for name in getattr(type(target), "_extension_params", ()):
        value, default = params.get(name), type(target)._default(name)
        try:
            if bool(value == default) and type(value) is type(default):
                params.pop(name)
        except Exception:  # values without a boolean equality (tensors) are reported
            continue
    return params


class _Pending:
    """Mutable handle yielded by :meth:`ScoreTimer.__call__` (sample count may change)."""

    __slots__ = ("n_samples",)

    def __init__(self, n_samples: int) -> None:
        self.n_samples = n_samples


_OPERATIONS = {member.value: member for member in ScoreTimerOperation}


class _Totals:
    """Running statistics of one operation (all entries, including those no longer kept)."""

    __slots__ = ("count", "duration", "max_duration", "min_duration", "n_samples")

    def __init__(self) -> None:
        self.count = 0
        self.n_samples = 0
        self.duration = 0.0
        self.min_duration = math.inf
        self.max_duration = 0.0

    def add(self, n_samples: int, duration: float) -> None:
        self.count += 1
        self.n_samples += n_samples
        self.duration += duration
        self.min_duration = min(self.min_duration, duration)
        self.max_duration = max(self.max_duration, duration)

    def as_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "n_samples": self.n_samples,
            "duration": self.duration,
            "min_duration": self.min_duration if self.count else math.nan,
            "max_duration": self.max_duration if self.count else math.nan,
        }


class ScoreTimer:
    """Records calibration and inference durations of a score (weakly referenced).

    The API and report are the reference's. Memory is bounded for long-running services: the
    timer keeps the ``max_entries`` most recent entries (``None``: all, as the reference) and
    running statistics of *every* entry (:attr:`totals`); ``enabled = False`` turns it off
    (nothing stored). Both are class defaults that an instance may override.

    *Shared work.* When several scores share one forward pass (``fit_jointly``, joint
    inference), that pass is charged to no score's entries: each entry holds the score's own
    work only, and the shared seconds the score used are accumulated in :attr:`shared`.
    """

    #: Most recent entries kept per timer (``None`` keeps all of them).
    max_entries: int | None = 10_000
    #: When ``False``, nothing is recorded (deployment off switch).
    enabled: bool = True

    def __init__(self, target: object) -> None:
        self._type_name = type(target).__qualname__
        self._ref = weakref.ref(target)
        self._stats: deque[ScoreTimerStat] = deque(maxlen=self.max_entries)
        self._totals: dict[ScoreTimerOperation, _Totals] = {}
        self._shared: dict[ScoreTimerOperation, float] = {}
        self._params_key: tuple[int, ...] | None = None
        self._params_version: int | None = None
        self._checked_type: type | None = None
        self._params_snapshot: MappingProxyType[str, Any] = MappingProxyType({})
        self._lock = threading.Lock()  # one score may be called from many threads at once

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def target(self) -> Any:
        """The timed object, or ``None`` once it was garbage-collected."""
        return self._ref()

    @property
    def stats(self) -> tuple[ScoreTimerStat, ...]:
        """The kept stats (at most ``max_entries``), oldest first."""
        with self._lock:
            return tuple(self._stats)

    @property
    def calibration(self) -> tuple[ScoreTimerStat, ...]:
        """Kept calibration stats, oldest first."""
        return tuple(s for s in self.stats if s.op == ScoreTimerOperation.CALIBRATION)

    @property
    def inference(self) -> tuple[ScoreTimerStat, ...]:
        """Kept inference stats, oldest first."""
        return tuple(s for s in self.stats if s.op == ScoreTimerOperation.INFERENCE)

    @property
    def totals(self) -> dict[str, dict[str, float]]:
        """Per operation, running ``count``, ``n_samples``, ``duration`` (sum), ``min_duration``
        and ``max_duration`` over every recorded entry, kept or not."""
        with self._lock:
            return {op.value: totals.as_dict() for op, totals in self._totals.items()}

    @property
    def n_dropped(self) -> int:
        """Number of entries no longer kept (older than the ``max_entries`` most recent)."""
        with self._lock:
            return sum(t.count for t in self._totals.values()) - len(self._stats)

    @property
    def shared(self) -> dict[str, float]:
        """Per operation, seconds of shared work (e.g. a joint forward pass) this score used
        but that is not charged to its entries."""
        with self._lock:
            return {op.value: seconds for op, seconds in self._shared.items()}

    def _live_target(self) -> Any:
        target = self._ref()
        if target is None:
            msg = f"Target {self._type_name!r} object is dead"
            raise RuntimeError(msg)
        if type(target) is not self._checked_type and not hasattr(target, "params"):
            msg = (
                f"Target {target} is missing a required 'params' attribute. Hint: "
                "ScoreTimer instances should only target Score instances"
            )
            raise AttributeError(msg)
        self._checked_type = type(target)
        return target

    def _params(self, target: Any) -> MappingProxyType[str, Any]:
        """Snapshot of the target's parameters, taken again only when a parameter was set
        (``ParamClass`` counts assignments) or, for other targets, changed identity."""
        with self._lock:
            return self._params_unlocked(target)

    def _params_unlocked(self, target: Any) -> MappingProxyType[str, Any]:
        version = getattr(target, "_param_version", None)
        if version is not None and type(version) is int:
            if version == self._params_version:
                return self._params_snapshot
            self._params_version = version
            self._params_snapshot = _snapshot(_reported_params(target))
            return self._params_snapshot
        params = _reported_params(target)
        key = tuple(id(value) for value in params.values())
        if key != self._params_key or tuple(params) != tuple(self._params_snapshot):
            self._params_snapshot = _snapshot(params)
            self._params_key = key
        return self._params_snapshot

    def _store(self, stat: ScoreTimerStat) -> None:
        with self._lock:
            self._store_unlocked(stat)

    def _store_unlocked(self, stat: ScoreTimerStat) -> None:
        if self._stats.maxlen != self.max_entries:  # max_entries changed: resize the window
            self._stats = deque(self._stats, maxlen=self.max_entries)
        self._stats.append(stat)
        totals = self._totals.get(stat.op)
        if totals is None:
            totals = self._totals[stat.op] = _Totals()
        totals.add(stat.n_samples, stat.duration)

    @contextmanager
    def __call__(self, op: ScoreTimerOperationLike, /, *, n_samples: int) -> Iterator[_Pending]:
        """Time the body of a ``with`` block; the stat is stored only on normal exit.

        The yielded handle's ``n_samples`` may be updated inside the block, for streams whose
        length is only known once consumed.
        """
        target = self._live_target()
        operation = ScoreTimerOperation(op)
        params = self._params(target) if self.enabled else self._params_snapshot
        del target
        pending = _Pending(int(n_samples))
        start = perf_counter()
        yield pending
        duration = perf_counter() - start
        if self.enabled:
            self._store(ScoreTimerStat(operation, pending.n_samples, duration, params))

    def add(self, op: ScoreTimerOperationLike, n_samples: int, duration: float) -> None:
        """Store a duration measured elsewhere (same checks as the context manager; O(1))."""
        target = self._live_target()
        operation = _OPERATIONS.get(op) or ScoreTimerOperation(op)
        if self.enabled:
            params = self._params(target)
            self._store(ScoreTimerStat(operation, int(n_samples), float(duration), params))

    def add_shared(self, op: ScoreTimerOperationLike, seconds: float) -> None:
        """Account ``seconds`` of shared work used by the score but charged to no entry."""
        operation = ScoreTimerOperation(op)
        if self.enabled:
            with self._lock:
                self._shared[operation] = self._shared.get(operation, 0.0) + float(seconds)

    def _report_table(self) -> Table | None:
        stats = list(self.stats)[::-1]
        if not stats:
            return None
        keys = set(stats[0].params)
        for stat in stats[1:]:
            keys &= set(stat.params)
        common = {}
        for key in sorted(keys):
            value = stats[0].params[key]
            try:
                if all(bool(s.params[key] == value) for s in stats[1:]):
                    common[key] = value
            except Exception:  # values without a boolean equality (tensors)
                continue
        title = f"ScoreTimer report for {self._type_name}(" + ", ".join(
            f"{k}={v!r}" for k, v in common.items()
        )
        title += ")"
        target = self.target
        if target is not None:
            title += f"\nat {hex(id(target))}"
        extras = [
            ", ".join(f"{k}={v!r}" for k, v in s.params.items() if k not in common) for s in stats
        ]
        show_extra = any(extras)
        table = Table(
            title=ReprHighlighter()(title),
            caption="Entries are listed from newest to oldest"
            + (f" ({self.n_dropped} older entries not kept)" if self.n_dropped else ""),
            box=HEAVY_HEAD_ROUNDED_BOTTOM,
            safe_box=False,
            show_lines=True,
            highlight=True,
        )
        if show_extra:
            table.add_column("Extra params", justify="left")
        table.add_column("Operation", justify="center")
        table.add_column("# samples", justify="right")
        table.add_column("Duration", justify="center")
        groups: list[tuple[str, list[ScoreTimerStat]]] = []
        for extra, stat in zip(extras, stats):
            if groups and groups[-1][0] == extra:
                groups[-1][1].append(stat)
            else:
                groups.append((extra, [stat]))
        for extra, group in groups:
            cells = [
                "\n".join(str(s.op.value) for s in group),
                "\n".join(str(s.n_samples) for s in group),
                "\n".join(format_time(s.duration) for s in group),
            ]
            table.add_row(*([extra, *cells] if show_extra else cells))
        return table

    @property
    def report(self) -> None:
        """Print (with rich) a table of every timed operation, newest first."""
        table = self._report_table()
        if table is not None:
            rich.print(table)
