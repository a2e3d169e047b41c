"""Property-based checks of the error contract (docs/errors.md) with ``hypothesis``: batches
mixing finite and non-finite samples, odd shapes and dtypes, calibration sets with
non-finite samples, labels of any length, and the hyper-parameter ranges.

Example counts are bounded and the draws derandomised, so the suite stays fast and
reproducible; each example reuses the scores fitted once per session.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from scio.scores.core.calibration import CalibStream
from scio.scores.core.validation import InputDeviceError, InputDtypeError, ParamRange
from tests.catalogue import CATALOGUE
from tests.contract_support import N_CALIB, assert_same_values, data, fitted, recorder

NAMES = [entry.name for entry in CATALOGUE]
BY_NAME = {entry.name: entry for entry in CATALOGUE}
NONFINITE = (math.nan, math.inf, -math.inf)


def _settings(n: int) -> Any:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _batch(seed: int, n: int, scale: float) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 4, 4, generator=generator) - 0.5) * scale


@st.composite
def mixed_batches(draw: Any) -> tuple[str, Tensor, Tensor]:
    """A catalogue score and a batch where some samples hold NaN or ±inf somewhere."""
    name = draw(st.sampled_from(NAMES))
    n = draw(st.integers(1, 7))
    x = _batch(draw(st.integers(0, 2**16)), n, draw(st.sampled_from([1.0, 4.0, 20.0])))
    bad = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    for row in bad.nonzero().flatten().tolist():
        for _ in range(draw(st.integers(1, 3))):  # one or more bad values in the sample
            position = draw(st.integers(0, 15))
            x[row].view(-1)[position] = draw(st.sampled_from(NONFINITE))
    return name, x, bad


@_settings(40)
@given(mixed_batches())
def test_every_sample_is_scored_independently(case: tuple[str, Tensor, Tensor]) -> None:
    name, x, bad = case
    score = fitted(BY_NAME[name]).score
    out, conformity = score(x)
    assert out.shape[0] == conformity.shape[0] == len(x)
    assert conformity[bad].isnan().all()
    if bool(bad.all()):
        return
    alone_out, alone = score(x[~bad])
    torch.testing.assert_close(conformity[~bad], alone, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out[~bad], alone_out, rtol=0, atol=0, equal_nan=True)


DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
SHAPES = [(1, 4, 4), (1, 4, 3), (4, 4), (1, 1, 4, 4), (2, 4, 4), (16,), ()]


@_settings(80)
@given(
    st.sampled_from(NAMES),
    st.integers(0, 4),
    st.sampled_from(SHAPES),
    st.sampled_from(DTYPES),
    st.booleans(),
)
def test_odd_batches_meet_the_contract(
    name: str, n: int, shape: tuple[int, ...], dtype: torch.dtype, as_numpy: bool
) -> None:
    """Any batch either runs (float32 samples of the calibration shape) or raises one of the
    contract's exceptions naming `inputs`: never an error from inside the network."""
    score = fitted(BY_NAME[name]).score
    x = torch.zeros((n, *shape)).to(dtype)
    inputs: Any = x.numpy() if as_numpy and dtype != torch.bfloat16 else x
    valid = not as_numpy and n > 0 and shape == (1, 4, 4) and dtype == torch.float32
    if valid:
        out, conformity = score(inputs)
        assert out.shape[0] == conformity.shape[0] == n
        return
    if isinstance(inputs, np.ndarray):
        expected: tuple[type[Exception], ...] = (TypeError,)
    elif n == 0 or shape != (1, 4, 4):
        expected = (ValueError,)
    else:
        expected = (InputDtypeError,)
    with pytest.raises(expected) as info:
        score(inputs)
    assert "`inputs`" in str(info.value)
    assert not isinstance(info.value, InputDeviceError)


@_settings(12)
@given(
    st.sampled_from(NAMES),
    st.lists(st.integers(0, N_CALIB), min_size=1, max_size=4),
    st.sampled_from(NONFINITE),
)
def test_calibration_drops_nonfinite_samples(name: str, positions: list[int], value: float) -> None:
    """Non-finite samples inserted anywhere in the calibration set (with labels) change
    nothing: the fitted score gives bit-identical results."""
    entry = BY_NAME[name]
    reference = fitted(entry).score
    calib, labels, test = data()
    rows, row_labels = list(calib), labels.tolist()
    for i, position in enumerate(sorted(positions, reverse=True)):
        sample = torch.rand(1, 4, 4)
        sample[0, i % 4, 1] = value
        rows.insert(position, sample)
        row_labels.insert(position, i % 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        score = entry.make().fit(recorder(entry), torch.stack(rows), torch.tensor(row_labels))
    counts = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert counts == [
        f"{len(positions)} of the {N_CALIB + len(positions)} calibration samples hold non-finite "
        f"values (NaN or ±inf) and were dropped: the score is fit on the {N_CALIB} others (pass "
        "`nonfinite='raise'` to refuse them instead)"
    ]
    for now, before in zip(score(test), reference(test), strict=True):
        torch.testing.assert_close(now, before, rtol=0, atol=0, equal_nan=True)


LABEL_KINDS = ["tensor", "list", "numpy", "tuple", "none", "ellipsis"]


@_settings(80)
@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.data(),
    st.sampled_from(LABEL_KINDS),
    st.sampled_from(["drop", "raise"]),
)
def test_calibration_stream_labels_and_rows(
    sizes: list[int], draw: Any, kind: str, policy: str
) -> None:
    """Labels of another count than their inputs always raise; dropped samples take their
    labels with them, so inputs and labels stay aligned."""
    batches, expected_rows, wrong, has_bad = [], [], False, False
    for b, size in enumerate(sizes):
        inputs = torch.arange(size * 2, dtype=torch.float32).reshape(size, 2) + 100 * b
        bad = draw.draw(st.lists(st.booleans(), min_size=size, max_size=size))
        for row, is_bad in enumerate(bad):
            if is_bad:
                inputs[row, draw.draw(st.integers(0, 1))] = draw.draw(st.sampled_from(NONFINITE))
        n_labels = size + draw.draw(st.sampled_from([0, 0, 0, -1, 1]))
        ids = [int(v) for v in inputs[:, 0].nan_to_num(-1, -2, -3).tolist()][:n_labels]
        ids += [-7] * (n_labels - len(ids))
        labels: Any = {
            "tensor": torch.tensor(ids),
            "list": ids,
            "numpy": np.array(ids),
            "tuple": tuple(ids),
            "none": None,
            "ellipsis": ...,
        }[kind]
        wrong = wrong or (kind not in ("none", "ellipsis") and n_labels != size)
        has_bad = has_bad or any(bad)
        batches.append((inputs, labels))
        expected_rows += [inputs[r] for r in range(size) if not bad[r]]
    stream = CalibStream(batches, policy)
    if wrong or (policy == "raise" and has_bad):
        with pytest.raises(ValueError, match=r"`calib_labels` must have shape|non-finite"):
            list(stream)
        return
    out = list(stream)
    assert stream.n_seen == sum(sizes) and stream.dropped == sum(sizes) - len(expected_rows)
    kept = [row for inputs, _ in out for row in inputs]
    assert_same_values(kept, expected_rows)
    for inputs, labels in out:
        assert torch.isfinite(inputs).all()
        if kind in ("none", "ellipsis"):
            continue
        assert [int(v) for v in list(labels)] == [int(v) for v in inputs[:, 0].tolist()]


@_settings(150)
@given(
    st.floats(allow_nan=True, allow_infinity=True),
    st.one_of(st.none(), st.floats(-10, 10)),
    st.one_of(st.none(), st.floats(-10, 10)),
    st.booleans(),
    st.booleans(),
)
def test_param_ranges(
    value: float, low: float | None, high: float | None, low_open: bool, high_open: bool
) -> None:
    valid = ParamRange.interval(low, high, low_open=low_open, high_open=high_open)
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    assert valid.accepts(value) == (not math.isnan(value) and above and below)
    assert not valid.accepts(None)
    assert ParamRange.interval(low, high, optional=True).accepts(None)
