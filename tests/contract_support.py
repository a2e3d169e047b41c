"""Shared helpers of the error-contract tests (``docs/errors.md``): every catalogue entry
fitted once on one shared network, and snapshots of a network and of a score's state."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from scio.recorder import Recorder
from scio.scores import BaseScore
from scio.scores.core.base import NoCalibration
from tests.catalogue import CATALOGUE, Entry
from tests.conftest import TinyConvNet, make_net

N_CALIB = 40
N_CLASSES = 3


def data(n: int = N_CALIB, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Calibration inputs, their labels (3 classes) and 8 test inputs."""
    generator = torch.Generator().manual_seed(seed)
    calib = torch.rand(n, 1, 4, 4, generator=generator)
    labels = torch.randint(0, N_CLASSES, (n,), generator=generator)
    test = torch.rand(8, 1, 4, 4, generator=generator)
    return calib, labels, test


def nothing_to_learn(score: BaseScore) -> bool:
    """Scores that, as in the reference, accept any calibration data (they read none)."""
    return isinstance(score, NoCalibration) and not hasattr(score, "_calib_prepare")


@dataclass
class Fitted:
    """A catalogue entry fitted on the shared network (``calib``/``labels``)."""

    entry: Entry
    rnet: Recorder
    score: Any


_NET: list[TinyConvNet] = []
_FITTED: dict[str, Fitted] = {}


def shared_net() -> TinyConvNet:
    """One network for every fitted entry (so they can also run jointly)."""
    if not _NET:
        _NET.append(make_net())
    return _NET[0]


def recorder(entry: Entry, net: nn.Module | None = None) -> Recorder:
    net = shared_net() if net is None else net
    rnet = Recorder(net, input_data=data()[0][:1])
    rnet.record(*entry.layers)
    return rnet


def fitted(entry: Entry) -> Fitted:
    """``entry`` fitted once per session on :func:`data` (tests must leave it as it was)."""
    if entry.name not in _FITTED:
        calib, labels, _ = data()
        rnet = recorder(entry)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. classes absent from the tiny data
            score = entry.make().fit(rnet, calib, labels)
        _FITTED[entry.name] = Fitted(entry, rnet, score)
    return _FITTED[entry.name]


ENTRY_IDS = [entry.name for entry in CATALOGUE]


@contextmanager
def paused_gc() -> Iterator[None]:
    """No automatic garbage collection inside: hooks only change if the code under test
    changes them (a full collection costs too much to run before every snapshot)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# -- the network, untouched ----------------------------------------------------------------------
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
)


def net_snapshot(net: nn.Module) -> dict[str, Any]:
    """Parameters and buffers (copies), ``requires_grad`` flags, modes and hooks of ``net``.

    Use it under :func:`paused_gc`: a recorder dropped by an earlier test and collected
    between two snapshots would take its hooks with it."""
    return {
        "tensors": {k: v.detach().clone() for k, v in net.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in net.named_parameters()},
        "grads": {k: p.grad is None for k, p in net.named_parameters()},
        "training": {k: m.training for k, m in net.named_modules()},
        "hooks": {
            k: tuple(tuple(getattr(m, d, {}).keys()) for d in _HOOK_DICTS)
            for k, m in net.named_modules()
        },
    }


def assert_net_untouched(net: nn.Module, before: dict[str, Any]) -> None:
    after = net_snapshot(net)
    for key in ("requires_grad", "grads", "training", "hooks"):
        assert after[key] == before[key], key
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert after["tensors"][name].dtype == tensor.dtype, name
        assert torch.equal(after["tensors"][name], tensor), name


# -- the score, untouched ------------------------------------------------------------------------
def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if hasattr(value, "samples"):  # an Index
        return _copy(value.samples)
    return value


def score_snapshot(score: BaseScore) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every attribute of ``score`` (by identity) and copies of its fitted values."""
    state = dict(score.__dict__)
    fitted_values = {a: _copy(state[a]) for a in score._fitted_attrs if a in state}
    return state, fitted_values


def assert_same_values(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_values(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_values(a[key], b[key])
    else:
        assert a == b or (a != a and b != b)


def assert_score_untouched(score: BaseScore, before: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Same attributes (the very same objects) and bit-identical fitted values."""
    state, fitted_values = before
    now = score.__dict__
    assert now.keys() == state.keys(), set(now) ^ set(state)
    for key, value in state.items():
        assert now[key] is value, key
    assert_same_values(score_snapshot(score)[1], fitted_values)
