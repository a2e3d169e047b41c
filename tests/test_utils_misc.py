"""check, format_time, ScoreTimer, enums and the parameter system."""

from __future__ import annotations

import gc
import inspect

import pytest

from scio.utils import IndexMetric, ScoreClassifMode, ScoreTimer, check, format_time
from scio.utils.enums import EnumWithExplicitSupport
from scio.utils.misc import ScoreTimerStat
from scio.utils.params import MISSING, ParamClass


def test_check_raises_assertion_with_message() -> None:
    check(True)
    with pytest.raises(AssertionError, match="^boom$"):
        check(0, "boom")
    with pytest.raises(AssertionError, match="^$"):
        check(False)


@pytest.mark.parametrize(
    ("duration", "num_digits", "expected"),
    [
        (1.5, 4, "1.500 s"),
        (0.56789, 4, "567.9 ms"),
        (0.99995, 4, "1.000 s"),
        (0.12345, 4, "123.4 ms"),
        (1234, 4, "1234. s"),
        (12345, 4, "12345 s"),
        (0, 4, "0.000 as"),
        (5.67e-20, 4, "0.057 as"),
        (99999.49999, 4, "99999 s"),
        (0.1, 3, "100. ms"),
        (0.03749, 4, "37.49 ms"),
        (2.5e-7, 4, "250.0 ns"),
    ],
)
def test_format_time_table(duration: float, num_digits: int, expected: str) -> None:
    assert format_time(duration, num_digits) == expected


def test_format_time_bounds() -> None:
    with pytest.raises(AssertionError, match="Display at least 3 digits"):
        format_time(1.0, 2)
    with pytest.raises(AssertionError, match="Duration out of bounds"):
        format_time(-1.0)
    with pytest.raises(AssertionError, match="Duration out of bounds"):
        format_time(10**5)


class _Target(ParamClass):
    a: int = 1
    b: str = "x"


def test_timer_stats_and_weakref() -> None:
    target = _Target()
    timer = ScoreTimer(target)
    assert timer.target is target
    with timer("calibration", n_samples=10):
        pass
    target.b = "y"
    with timer("inference", n_samples=5):
        pass
    assert [s.op.value for s in timer.stats] == ["calibration", "inference"]
    assert [s.n_samples for s in timer.calibration] == [10]
    assert [s.n_samples for s in timer.inference] == [5]
    assert isinstance(timer.stats[0], ScoreTimerStat)
    assert timer.stats[0].params["b"] == "x"
    assert timer.stats[1].params["b"] == "y"
    assert all(s.duration >= 0 for s in timer.stats)
    del target
    gc.collect()
    assert timer.target is None
    with (
        pytest.raises(RuntimeError, match="Target '_Target' object is dead"),
        timer("inference", n_samples=1),
    ):
        pass


def test_timer_requires_params_and_skips_failed_blocks() -> None:
    class NoParams:
        pass

    obj = NoParams()
    with (
        pytest.raises(AttributeError, match="missing a required 'params' attribute"),
        ScoreTimer(obj)("inference", n_samples=1),
    ):
        pass
    target = _Target()
    timer = ScoreTimer(target)
    with pytest.raises(ZeroDivisionError), timer("inference", n_samples=1):
        _ = 1 / 0
    assert timer.stats == ()


def test_timer_report(capsys: pytest.CaptureFixture[str]) -> None:
    target = _Target()
    timer = ScoreTimer(target)
    timer.report
    assert capsys.readouterr().out == ""
    with timer("calibration", n_samples=10):
        pass
    with timer("inference", n_samples=5):
        pass
    timer.report
    out = capsys.readouterr().out
    assert "ScoreTimer report for" in out
    flat = " ".join(out.split())
    assert "ScoreTimer report for _Target(a=1, b='x')" in flat
    assert f"at {hex(id(target))}" in out
    for column in ("Operation", "# samples", "Duration"):
        assert column in out
    assert "Extra params" not in out
    assert out.index("inference") < out.index("calibration")  # newest first
    assert "Entries are listed from newest to oldest" in flat
    target.a = 2
    with timer("inference", n_samples=3):
        pass
    timer.report
    out = capsys.readouterr().out
    assert "Extra params" in out
    assert "a=2" in out
    assert "┏" in out and "╰" in out


def test_enums_signature_and_message() -> None:
    assert str(inspect.signature(IndexMetric)) == "(value)"
    assert IndexMetric("l2") is IndexMetric.L2
    assert IndexMetric.L2 == "l2"
    with pytest.raises(
        ValueError, match=r"^'x' is not a valid IndexMetric\. Supported: 'ip', 'l2'$"
    ):
        IndexMetric("x")
    with pytest.raises(ValueError, match="Supported: 'diff', 'ratio', 'raw'"):
        ScoreClassifMode("bad")

    class Arg(str, EnumWithExplicitSupport):
        V1 = "value1"
        V2 = "value2"

    # the reference names the enum by its __qualname__
    with pytest.raises(
        ValueError,
        match=r"^'value3' is not a valid test_enums_signature_and_message\.<locals>\.Arg\. "
        r"Supported: 'value1', 'value2'$",
    ):
        Arg("value3")
    assert str(inspect.signature(Arg)) == "(value)"


def test_enum_members_have_str_enum_semantics() -> None:
    """``(str, Enum)`` as in the reference: ``str`` is ``Class.MEMBER``, not the value."""
    from scio.utils.enums import InterpolationKind

    member = InterpolationKind.CONVEX_HULL
    assert repr(member) == "<InterpolationKind.CONVEX_HULL: 'convex_hull'>"
    assert str(member) == "InterpolationKind.CONVEX_HULL"
    assert f"{member}" == "InterpolationKind.CONVEX_HULL"
    assert member == "convex_hull"
    assert isinstance(member, str)


class _Base(ParamClass):
    first: float | None = None


class _Child(_Base):
    required: int
    second: str = "s"
    first: float | None = 2.0  # re-annotated: keeps its original position


def test_params_order_repr_str() -> None:
    obj = _Child(required=3)
    assert list(obj.params) == ["first", "required", "second"]
    assert repr(obj) == "_Child(first=2.0, required=3, second='s')"
    assert str(obj) == "_Child(required=3)"
    empty = _Child()
    assert empty.missing_params == ("required",)
    assert repr(empty) == "_Child(first=2.0, required=?, second='s')"
    assert str(empty) == "_Child(required=?)"
    assert empty.params["required"] is MISSING


def test_params_set_del_and_errors() -> None:
    calls: list[tuple[str, object]] = []

    class Watched(_Child):
        def _on_param_will_be_set(self, attr: str, future_val: object) -> None:
            calls.append((attr, future_val))

    obj = Watched(required=1)
    assert calls == [("required", 1)]
    obj.set_params(second="t", first=None)
    assert obj.second == "t" and obj.first is None
    with pytest.raises(AttributeError, match="'nope' is not a parameter"):
        obj.set_params(nope=1)
    del obj.second
    assert obj.second == "s"
    del obj.required
    assert obj.missing_params == ("required",)
    with pytest.raises(AttributeError, match="has no value yet"):
        _ = obj.required
    with pytest.raises(TypeError, match="unexpected parameter"):
        _Child(bad=1)


def _timer_growth(n_calls: int) -> int:
    """Bytes still allocated by the timer's module after ``n_calls`` more ``add`` calls."""
    import tracemalloc

    target = _Target()
    timer = ScoreTimer(target)
    timer.max_entries = 1_000
    for _ in range(2_000):  # fill the window first
        timer.add("inference", 1, 1e-6)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(n_calls):
        timer.add("inference", i % 7, 1e-6)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert len(timer.stats) == 1_000
    assert timer.totals["inference"]["count"] == 2_000 + n_calls
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


def test_timer_memory_is_bounded() -> None:
    """Past the window, memory is the window's (1,000 entries of < 150 B: the entries made
    during the measurement replace older ones), whatever the number of calls; the unbounded
    timer grew by ~370 B per call."""
    assert _timer_growth(50_000) < 1_000 * 150


@pytest.mark.slow
def test_timer_memory_flat_over_a_million_calls() -> None:
    assert _timer_growth(1_000_000) < 1_000 * 150


def test_timer_window_totals_and_off_switch(capsys: pytest.CaptureFixture[str]) -> None:
    target = _Target()
    timer = ScoreTimer(target)
    timer.max_entries = 3
    for i in range(5):
        timer.add("inference", 10 + i, float(i))
    timer.add("calibration", 100, 0.5)
    assert [s.n_samples for s in timer.stats] == [13, 14, 100]
    assert timer.n_dropped == 3
    assert timer.totals["inference"] == {
        "count": 5,
        "n_samples": 60,
        "duration": 10.0,
        "min_duration": 0.0,
        "max_duration": 4.0,
    }
    assert timer.totals["calibration"]["count"] == 1
    timer.report
    assert "3 older entries not kept" in " ".join(capsys.readouterr().out.split())
    timer.enabled = False
    timer.add("inference", 1, 1.0)
    with timer("inference", n_samples=1):
        pass
    assert len(timer.stats) == 3
    assert timer.totals["inference"]["count"] == 5
    timer.enabled = True
    timer.max_entries = None  # unbounded, as the reference
    for _ in range(5):
        timer.add("inference", 1, 0.0)
    assert len(timer.stats) == 8
    # params snapshots follow parameter changes
    target.a = 5
    timer.add("inference", 1, 0.0)
    assert timer.stats[-1].params["a"] == 5
    assert timer.stats[-2].params["a"] == 1
    timer.add_shared("calibration", 2.5)
    assert timer.shared == {"calibration": 2.5}
