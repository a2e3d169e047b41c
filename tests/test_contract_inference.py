"""The error contract at inference (docs/errors.md), for every catalogue entry.

Bad inputs raise the documented exception, whose message names the argument, the expected
and the actual value, before anything runs (the network and the score are untouched); a
sample holding NaN or ±inf gets a NaN conformity and its own network output, and every other
sample of the batch is bit-identical to the batch without it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from scio.scores import JointInference
from scio.scores.core.validation import InputDeviceError, InputDtypeError
from tests.catalogue import CATALOGUE, Entry
from tests.contract_support import (
    assert_net_untouched,
    assert_score_untouched,
    data,
    fitted,
    net_snapshot,
    paused_gc,
    score_snapshot,
    shared_net,
)

ENTRIES = [pytest.param(entry, id=entry.name) for entry in CATALOGUE]


@pytest.fixture(autouse=True)
def _paused_gc() -> Iterator[None]:
    with paused_gc():  # hooks change only if the code under test changes them
        yield


#: (class of bad input, how to make it from a good batch, exception types, message pattern)
BAD_INPUTS: list[tuple[str, Callable[[Tensor], Any], tuple[type[Exception], ...], str]] = [
    (
        "numpy",
        lambda x: x.numpy(),
        (TypeError,),
        r"`inputs` must be a torch.Tensor or a dict of tensors \(got ndarray",
    ),
    (
        "list",
        lambda x: x.tolist(),
        (TypeError,),
        r"`inputs` must be a torch.Tensor or a dict of tensors \(got list\)",
    ),
    ("scalar", lambda x: x[0, 0, 0, 0], (ValueError,), r"at least one sample \(got shape \(\)\)"),
    ("empty", lambda x: x[:0], (ValueError,), r"at least one sample \(got shape \(0, 1, 4, 4\)"),
    (
        "sample-shape",
        lambda x: x[..., :3],
        (ValueError,),
        r"`inputs` samples must have shape \(1, 4, 4\) .*\(got \(1, 4, 3\)\)",
    ),
    (
        "sample-rank",
        lambda x: x[:, 0],
        (ValueError,),
        r"`inputs` samples must have shape \(1, 4, 4\) .*\(got \(4, 4\)\)",
    ),
    (
        "float64",
        lambda x: x.double(),
        (TypeError, RuntimeError),
        r"`inputs` is float64 but .*float32",
    ),
    (
        "float16",
        lambda x: x.half(),
        (TypeError, RuntimeError),
        r"`inputs` is float16 but .*float32",
    ),
    ("int64", lambda x: x.long(), (TypeError, RuntimeError), r"`inputs` is int64 but .*float32"),
    (
        "device",
        lambda x: x.to("meta"),
        (TypeError, ValueError),
        r"`inputs` is on meta but the network is on cpu",
    ),
]


@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_inputs_raise_the_contract_and_touch_nothing(entry: Entry) -> None:
    fit = fitted(entry)
    score, net = fit.score, shared_net()
    _, _, test = data()
    net_before, score_before = net_snapshot(net), score_snapshot(score)
    for name, make, types, pattern in BAD_INPUTS:
        bad = make(test)
        for call in (score, score.confidence, JointInference([score])):
            with pytest.raises(types[0], match=pattern) as info:
                call(bad)
            assert all(isinstance(info.value, kind) for kind in types), name
    assert issubclass(InputDtypeError, TypeError) and issubclass(InputDtypeError, RuntimeError)
    assert issubclass(InputDeviceError, TypeError) and issubclass(InputDeviceError, ValueError)
    assert_net_untouched(net, net_before)
    assert_score_untouched(score, score_before)
    with pytest.raises(RuntimeError, match="The score needs to be fit before inference"):
        entry.make()(test)


def _with_nonfinite(test: Tensor) -> tuple[Tensor, Tensor]:
    """``test`` with a NaN, a +inf and a -inf sample, and the mask of those rows."""
    x = test.clone()
    x[1, 0, 0, 0] = math.nan
    x[4, 0, 3, 2] = math.inf
    x[6, 0, 1, 1] = -math.inf
    bad = torch.zeros(len(x), dtype=torch.bool)
    bad[[1, 4, 6]] = True
    return x, bad


def _assert_bitwise(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _messages(record: list[warnings.WarningMessage]) -> set[str]:
    return {str(w.message) for w in record}


@pytest.mark.parametrize("entry", ENTRIES)
def test_nonfinite_samples_are_scored_alone(entry: Entry) -> None:
    fit = fitted(entry)
    score, net = fit.score, shared_net()
    _, _, test = data()
    x, bad = _with_nonfinite(test)
    net_before, score_before = net_snapshot(net), score_snapshot(score)
    with warnings.catch_warnings(record=True) as clean_warnings:
        warnings.simplefilter("always")
        clean_out, clean = score(x[~bad])
    with warnings.catch_warnings(record=True) as mixed_warnings:
        warnings.simplefilter("always")
        out, conformity = score(x)
    # no warning of its own (e.g. "adversarial perturbation failed") and no other sample moved
    assert _messages(mixed_warnings) <= _messages(clean_warnings)
    assert conformity.shape[0] == len(x) and out.shape[0] == len(x)
    _assert_bitwise(conformity[~bad], clean)
    _assert_bitwise(out[~bad], clean_out)
    assert conformity[bad].isnan().all()
    with torch.no_grad():
        _assert_bitwise(out[bad], net(x[bad]))

    all_out, all_bad = score(x[bad])  # no finite sample at all
    assert all_bad.shape == (int(bad.sum()), *conformity.shape[1:])
    assert all_bad.isnan().all() and all_bad.dtype == conformity.dtype
    _assert_bitwise(all_out, out[bad])
    assert_net_untouched(net, net_before)
    assert_score_untouched(score, score_before)


def test_joint_inference_keeps_the_contract() -> None:
    """One shared forward for every catalogue score: a batch with non-finite samples gives,
    for each score, exactly ``score(x)``; through ``run`` as well."""
    scores = [fitted(entry).score for entry in CATALOGUE]
    _, _, test = data()
    x, bad = _with_nonfinite(test)
    joint = JointInference(scores)
    results = joint(x)
    batched = joint.run([x, x[bad]])  # a batch of non-finite samples only, too
    for entry, score, (out, conformity), (run_out, run_conf) in zip(
        CATALOGUE, scores, results, batched, strict=True
    ):
        alone_out, alone = score(x)
        _assert_bitwise(out, alone_out)
        _assert_bitwise(conformity, alone)
        assert conformity[bad].isnan().all(), entry.name
        _assert_bitwise(run_out, torch.cat([out, out[bad]]))
        _assert_bitwise(run_conf, torch.cat([conformity, conformity[bad]]))
    for _name, make, types, pattern in BAD_INPUTS:
        with pytest.raises(types[0], match=pattern):
            joint(make(test))
