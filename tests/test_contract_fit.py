"""The error contract at calibration and for hyper-parameters (docs/errors.md), for every
catalogue entry.

A ``fit`` that raises names the argument, the expected and the actual value, and leaves the
score exactly as it was (still unfit, or still holding its previous fitted state and giving
the same results) and the network untouched. Non-finite calibration samples are dropped with
their labels and one warning (the fit equals a fit on the finite samples), or refused.
Hyper-parameters out of range raise ``ParamError`` at construction and at ``set_params``;
``act_norm`` alone is checked at ``fit``, with an empty message, as the reference's tests pin.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from scio.scores import JTLA, KNN, BaseScore, ReAct, fit_jointly
from scio.scores.core.validation import ParamError
from scio.utils.params import ParamClass
from tests.catalogue import CATALOGUE, Entry
from tests.contract_support import (
    N_CALIB,
    assert_net_untouched,
    assert_same_values,
    assert_score_untouched,
    data,
    fitted,
    net_snapshot,
    nothing_to_learn,
    paused_gc,
    recorder,
    score_snapshot,
    shared_net,
)

ENTRIES = [pytest.param(entry, id=entry.name) for entry in CATALOGUE]


@pytest.fixture(autouse=True)
def _paused_gc() -> Iterator[None]:
    with paused_gc():  # hooks change only if the code under test changes them
        yield


def _boom() -> Iterator[tuple[Tensor, Tensor]]:
    calib, labels, _ = data()
    yield calib[:20], labels[:20]
    raise RuntimeError("the loader failed")


def _nan_calib() -> tuple[Tensor, Tensor]:
    calib, labels, _ = data()
    bad = calib.clone()
    bad[[3, 17]] = math.nan
    return bad, labels


#: (class of bad calibration input, fit arguments, exception types, message pattern, whether
#: scores with nothing to learn also refuse it: as in the reference they accept any data,
#: but a tensor still goes through the label-count and non-finite checks)
Case = tuple[
    str, Callable[[], tuple[Any, ...]], dict[str, Any], tuple[type[Exception], ...], str, bool
]
C, Y, _T = data()
BAD_FITS: list[Case] = [
    (
        "numpy",
        lambda: (C.numpy(), Y),
        {},
        (TypeError,),
        r"`calib_data` must be a torch.Tensor",
        False,
    ),
    (
        "not-iterable",
        lambda: (3.0,),
        {},
        (TypeError,),
        r"`calib_data` must be a tensor or an iterable",
        False,
    ),
    (
        "bad-batch",
        lambda: ([(C[:5], Y[:5], None)],),
        {},
        (TypeError,),
        r"Calibration batch 0 must be a tensor, a dict batch or an \(inputs, labels\) pair "
        r"\(got tuple\)",
        False,
    ),
    ("empty", lambda: (C[:0], Y[:0]), {}, (ValueError,), r"at least one sample", False),
    (
        "sample-shape",
        lambda: ([(C[:5], Y[:5]), (C[5:10, ..., :3], Y[5:10])],),
        {},
        (ValueError,),
        r"`calib_data` samples must have shape \(1, 4, 4\) .*\(got \(1, 4, 3\)\)",
        False,
    ),
    (
        "float64",
        lambda: (C.double(), Y),
        {},
        (TypeError, RuntimeError),
        r"`calib_data` is float64 but the network computes in float32",
        False,
    ),
    (
        "int64",
        lambda: ((C * 10).long(), Y),
        {},
        (TypeError, RuntimeError),
        r"`calib_data` of dtype int64 .*the network computes in float32",
        False,
    ),
    (
        "device",
        lambda: (C.to("meta"), Y),
        {},
        (TypeError, ValueError),
        r"`calib_data` is on meta but the network is on cpu",
        False,
    ),
    (
        "labels-length",
        lambda: (C, Y[:-1]),
        {},
        (ValueError,),
        rf"`calib_labels` must have shape \({N_CALIB},\), one label per sample "
        rf"\(got \({N_CALIB - 1},\)\)",
        True,
    ),
    (
        "labels-length-list",
        lambda: (C, Y.tolist()[:5]),
        {},
        (ValueError,),
        r"`calib_labels` must have shape .*one label per sample \(got 5 labels\)",
        True,
    ),
    (
        "labels-length-batch",
        lambda: ([(C[:20], Y[:20]), (C[20:], Y[20:-1])],),
        {},
        (ValueError,),
        r"`calib_labels` must have shape \(20,\).*\(got \(19,\)\) \(calibration batch 1\)",
        False,
    ),
    (
        "labels-with-loader",
        lambda: ([(C, Y)], Y),
        {},
        (ValueError,),
        r"`calib_labels` must be None when `calib_data` is an iterable",
        False,
    ),
    (
        "nonfinite-raise",
        _nan_calib,
        {"nonfinite": "raise"},
        (ValueError,),
        r"`calib_data` holds 2 sample\(s\) with non-finite values .*first at row 3",
        True,
    ),
    (
        "nonfinite-policy",
        lambda: (C, Y),
        {"nonfinite": "keep"},
        (ValueError,),
        r"`nonfinite` must be one of \['drop', 'raise'\] \(got 'keep'\)",
        True,
    ),
    (
        "all-nonfinite",
        lambda: (torch.full_like(C, math.nan), Y),
        {},
        (ValueError,),
        r"at least one sample",
        False,
    ),
    (
        "all-nonfinite-stream",
        lambda: ([(torch.full_like(C, math.inf), Y)],),
        {},
        (ValueError,),
        r"at least one sample",
        False,
    ),
    ("loader-fails", lambda: (_boom(),), {}, (RuntimeError,), r"the loader failed", False),
]


def _check_failure(score: BaseScore, rnet: Any, case: Case, *, refuses: bool) -> None:
    name, make, kwargs, types, pattern, _ = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-finite warning comes before some failures
        if not refuses:
            score.fit(rnet, *make(), **kwargs)
            return
        with pytest.raises(types[0], match=pattern) as info:
            score.fit(rnet, *make(), **kwargs)
    assert all(isinstance(info.value, kind) for kind in types), name


@pytest.mark.parametrize("entry", ENTRIES)
def test_failed_fit_leaves_everything_as_it_was(entry: Entry) -> None:
    fit = fitted(entry)
    score, net = fit.score, shared_net()
    _, _, test = data()
    expected = score(test)
    free = nothing_to_learn(score)
    rnet = recorder(entry)  # before the snapshot: its hooks are the user's
    net_before, score_before = net_snapshot(net), score_snapshot(score)
    for case in BAD_FITS:
        refuses = case[5] or not free
        fresh = entry.make()
        fresh_before = score_snapshot(fresh)
        _check_failure(fresh, rnet, case, refuses=refuses)
        if refuses:
            assert not fresh.is_fit, case[0]
            assert_score_untouched(fresh, fresh_before)
            _check_failure(score, rnet, case, refuses=True)  # a fitted score: kept as it was
            assert_score_untouched(score, score_before)
    if not free:
        with pytest.raises(TypeError, match=r"`rnet` must be a scio Recorder \(got a plain nn"):
            entry.make().fit(net, C, Y)
    assert_net_untouched(net, net_before)
    assert score.is_fit
    for now, before in zip(score(test), expected, strict=True):
        torch.testing.assert_close(now, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("entry", ENTRIES)
def test_nonfinite_calibration_samples_are_dropped(entry: Entry) -> None:
    """Samples with NaN or ±inf (and their labels) are dropped with one warning saying how
    many: the fitted state is bit-identical to the fit on the finite samples alone."""
    reference = fitted(entry).score
    calib, labels, test = data()
    generator = torch.Generator().manual_seed(1)
    extra = torch.rand(3, 1, 4, 4, generator=generator)
    extra[0, 0, 0, 0], extra[1, 0, 2, 1], extra[2, 0, 3, 3] = math.nan, math.inf, -math.inf
    mixed = torch.cat([calib[:10], extra[:2], calib[10:], extra[2:]])
    mixed_labels = torch.cat([labels[:10], torch.tensor([2, 0]), labels[10:], torch.tensor([1])])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        score = entry.make().fit(recorder(entry), mixed, mixed_labels)
    dropped = [w for w in record if "non-finite" in str(w.message)]
    assert len(dropped) == 1
    assert str(dropped[0].message).startswith(f"3 of the {N_CALIB + 3} calibration samples hold")
    assert dropped[0].filename == __file__  # points at the caller's `fit`
    for attr in type(reference)._fitted_attrs:
        assert_same_values(_values(getattr(score, attr)), _values(getattr(reference, attr)))
    for now, before in zip(score(test), reference(test), strict=True):
        torch.testing.assert_close(now, before, rtol=0, atol=0, equal_nan=True)


def _values(value: Any) -> Any:
    if hasattr(value, "samples"):  # an Index
        return value.samples
    if isinstance(value, list | tuple):
        return [_values(v) for v in value]
    return value


def test_fit_jointly_drops_refuses_and_restores() -> None:
    """The same contract through one shared forward: dropped samples (one warning for the
    call), refused ones, and every score restored when any of them fails."""
    picks = [e for e in CATALOGUE if e.name in ("KNN", "DeepMahalanobis", "Energy", "ViM")]
    calib, labels, test = data()
    bad, _ = _nan_calib()
    clean = fit_jointly(
        [(e.make(), e.layers) for e in picks],
        shared_net(),
        calib[[i for i in range(N_CALIB) if i not in (3, 17)]],
        labels[[i for i in range(N_CALIB) if i not in (3, 17)]],
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mixed = fit_jointly([(e.make(), e.layers) for e in picks], shared_net(), bad, labels)
    assert sum("2 of the 40 calibration samples" in str(w.message) for w in record) == 1
    for a, b in zip(clean, mixed, strict=True):
        torch.testing.assert_close(a(test)[1], b(test)[1], rtol=0, atol=0, equal_nan=True)
    before = [score_snapshot(s) for s in mixed]
    with pytest.raises(ValueError, match="non-finite"):
        fit_jointly(
            [(s, e.layers) for s, e in zip(mixed, picks, strict=True)],
            shared_net(),
            bad,
            labels,
            nonfinite="raise",
        )
    with pytest.raises(ValueError, match=r"`calib_labels` must have shape \(10,\)"):
        batches = [(calib[:10], labels[:10]), (calib[10:20], labels[10:19])]
        fit_jointly(
            [(s, e.layers) for s, e in zip(mixed, picks, strict=True)], shared_net(), batches
        )
    for score, snapshot in zip(mixed, before, strict=True):
        assert_score_untouched(score, snapshot)


# -- hyper-parameters -------------------------------------------------------------------------
#: Values no score may accept for a parameter of this name (new scores are covered as soon as
#: they declare one).
UNIVERSAL_BAD: dict[str, list[Any]] = {
    "temperature": [0.0, -1.0, math.nan],
    "k": [0, -3],
    "fgm_norm": [0.5, 0.0, math.nan],
    "epsilon": [math.nan, math.inf],
    "bank_fraction": [0.0, 1.5, math.nan],
    "max_batch": [0, -1],
    "percentile": [-1.0, 101.0, math.nan],
}
#: The issue's cases, each with the valid range its message must state.
NAMED: list[tuple[str, dict[str, Any], str]] = [
    ("ODIN", {"temperature": 0.0}, r"`temperature` of ODIN must be a number > 0 \(got 0.0\)"),
    ("ODIN", {"temperature": -1.0}, r"`temperature` of ODIN must be a number > 0 \(got -1.0\)"),
    ("ODIN", {"fgm_norm": 0.5}, r"`fgm_norm` of ODIN must be a number >= 1 \(got 0.5\)"),
    ("Energy", {"temperature": -1.0}, r"`temperature` of Energy must be a number in \(0, inf\)"),
    ("Energy", {"temperature": 0.0}, r"`temperature` of Energy must be a number in \(0, inf\)"),
    ("Energy", {"temperature": math.inf}, r"`temperature` of Energy must be .*\(got inf\)"),
    ("KNN", {"k": 0}, r"`k` of KNN must be an integer > 0 \(got 0\)"),
    ("Gram", {"cut_off": 0.5}, r"`cut_off` of Gram must be a number in \(0, 0.5\)"),
    ("Trust", {"alpha": 1.0}, r"`alpha` of Trust must be a number in \[0, 1\)"),
    ("IsoMax", {"n_steps": -1}, r"`n_steps` of IsoMax must be an integer >= 0"),
    ("ViM", {"dim": 0}, r"`dim` of ViM must be an integer >= 1 \(or None\)"),
    ("JTLA", {"test": {"type": "binomial", "mode": "mle", "k": 2}}, r"`test` of JTLA must be"),
]


def _assert_param_error(entry: Entry, params: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ParamError, match=pattern) as info:
        entry.make(**params)  # construction + set_params
    assert isinstance(info.value, AssertionError) and isinstance(info.value, ValueError)
    score = entry.make()
    with pytest.raises(ParamError, match=pattern):
        score.set_params(**params)
    with pytest.raises(ParamError, match=pattern):
        setattr(score, *next(iter(params.items())))


@pytest.mark.parametrize("entry", ENTRIES)
def test_hyper_parameters_are_checked_when_set(entry: Entry) -> None:
    fit = fitted(entry)
    score = fit.score
    params = score.params
    before = score_snapshot(score)
    checked: set[str] = set()
    for name, values in UNIVERSAL_BAD.items():
        if name not in params:
            continue
        for value in values:
            _assert_param_error(
                entry,
                {name: value},
                rf"`{name}`.* must .*\(got {re.escape(repr(value))}\)",
            )
            with pytest.raises(ParamError):  # atomic: nothing is set, the score stays fit
                score.set_params(mode="diff", **{name: value})
            checked.add(name)
    # every declared range is enforced
    for name in params:
        valid = type(score)._range_of(name)
        if valid is None:
            continue
        for value in (0, -1, 0.5, 1e9, math.nan, math.inf, -math.inf, None):
            if valid.accepts(value):
                continue
            try:
                ParamClass._check_param_value(score, name, value)  # the annotation only
            except (TypeError, ValueError):
                continue  # refused by the annotation first
            pattern = rf"`{name}`.* must .*\(got {re.escape(repr(value))}\)"
            with pytest.raises(ParamError, match=pattern):
                score._check_param_value(name, value)
            checked.add(name)
    assert_score_untouched(score, before)
    assert score.is_fit
    # not vacuous: a range was probed here, or the score's ranges have their case in NAMED
    ranged = {name for name in params if type(score)._range_of(name) is not None}
    named = {next(iter(p)) for n, p, _ in NAMED if n == entry.name}
    assert checked or ranged <= named, ranged - named
    assert type(score)._range_of("act_norm") is None  # checked at fit (next test)


@pytest.mark.parametrize("entry", ENTRIES)
def test_act_norm_is_checked_at_fit_with_an_empty_message(entry: Entry) -> None:
    """The reference accepts ``act_norm = nan`` (or 0) when set, and ``fit`` raises an
    ``AssertionError`` with an empty message (its ``test_sanitizes_act_norm``): scio raises a
    ``ParamError`` (an ``AssertionError``) there, from a line that says what is wrong."""
    fit = fitted(entry)
    calib, labels, _ = data()
    net_before = net_snapshot(fit.rnet.net)
    for bad, why in ((0.0, "must not be 0"), (0, "must not be 0"), (math.nan, "must not be NaN")):
        score = entry.make(act_norm=bad)  # accepted at construction...
        score.set_params(act_norm=bad)  # ... and at every assignment
        score.act_norm = bad
        before = score_snapshot(score)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. classes absent from the tiny data
            with pytest.raises(ParamError, match="^$") as info:
                score.fit(fit.rnet, calib, labels)
        assert isinstance(info.value, AssertionError) and isinstance(info.value, ValueError)
        assert str(info.value) == ""
        lines = [str(frame.statement).strip() for frame in info.traceback]
        assert any(f"`act_norm` {why}" in line for line in lines), lines
        assert not score.is_fit
        assert_score_untouched(score, before)
    assert_net_untouched(fit.rnet.net, net_before)
    valid = entry.make(act_norm=math.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert valid.fit(fit.rnet, calib, labels).is_fit  # any other number is valid


@pytest.mark.parametrize(
    ("name", "params", "pattern"), NAMED, ids=[f"{n}-{next(iter(p))}" for n, p, _ in NAMED]
)
def test_named_hyper_parameter_errors(name: str, params: dict[str, Any], pattern: str) -> None:
    entry = next(e for e in CATALOGUE if e.name == name)
    _assert_param_error(entry, params, pattern)


def test_constraints_on_the_data_are_checked_at_fit() -> None:
    rnet = recorder(next(e for e in CATALOGUE if e.name == "KNN"))
    calib, labels, _ = data(n=5)
    with pytest.raises(ParamError, match=r"`k` must satisfy 0 < k <= n_calib = 5 .*\(got k=6\)"):
        KNN(k=6).fit(rnet, calib, labels)
    with pytest.raises(
        ParamError, match=r"`percentile` of ReAct must be > 50 with `symmetric=True` \(got 50.0\)"
    ):
        ReAct(percentile=50.0, symmetric=True).fit(rnet, calib, labels)
    with pytest.raises(
        ParamError, match=r"`test` of JTLA: its 'k' must satisfy 0 < k <= n_calib = 5 .*\(got k=6\)"
    ):
        JTLA(test={"type": "multinomial", "mode": "mle", "k": 6}).fit(rnet, calib, labels)
