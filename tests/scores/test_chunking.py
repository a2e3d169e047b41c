"""Bounded chunks for multi-pass scores: chunked results equal one-shot results, passes are
counted, the network's flags and the caller's tensors are left as they were."""

from __future__ import annotations

import math
import re

import pytest
import torch
from tests.conftest import make_net
from tests.scores.test_odin import naive_odin
from torch import Tensor, nn

from scio.recorder import Recorder
from scio.scores.classification import odds as odds_module
from scio.scores.classification.deepmahalanobis import DeepMahalanobis
from scio.scores.classification.featuresqueezing import FeatureSqueezing
from scio.scores.classification.odds import Odds
from scio.scores.classification.odin import ODIN
from scio.scores.core.input_grad import (
    DEFAULT_MAX_BATCH,
    by_chunks,
    check_max_batch,
    frozen_parameters,
    row_chunks,
)


def _data(n: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)).to(dtype)


class _PassLog:
    """Forward hook on the root module: batch size and parameter flags of every forward."""

    def __init__(self, net: nn.Module) -> None:
        self.sizes: list[int] = []
        self.grad_forwards: list[list[bool]] = []
        self.net = net
        self.handle = net.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        self.sizes.append(len(args[0]))
        if torch.is_grad_enabled():
            self.grad_forwards.append([p.requires_grad for p in self.net.parameters()])

    def clear(self) -> None:
        self.sizes.clear()
        self.grad_forwards.clear()


# -- helpers ----------------------------------------------------------------------------------
def test_row_chunks_and_by_chunks() -> None:
    assert list(row_chunks(7, 3)) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert list(row_chunks(7, None)) == [slice(0, 7)]
    assert list(row_chunks(7, 7)) == [slice(0, 7)]
    assert list(row_chunks(0, 3)) == [slice(0, 0)]  # per-chunk code still runs once
    x = torch.arange(10.0)
    calls: list[int] = []

    def fn(rows: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(len(rows))
        return rows * 2, rows[:, None] + 1

    doubled, column = by_chunks(fn, x, 4)
    assert calls == [4, 4, 2]
    assert torch.equal(doubled, x * 2)
    assert torch.equal(column, x[:, None] + 1)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "8"])
def test_check_max_batch(bad: object) -> None:
    check_max_batch(None)
    check_max_batch(1)
    with pytest.raises(
        ValueError, match=re.escape(f"`max_batch` must be a positive integer or None (got {bad!r})")
    ):
        check_max_batch(bad)


def test_frozen_parameters_restores_every_flag() -> None:
    net = make_net()
    net.conv.bias.requires_grad_(False)
    before = [p.requires_grad for p in net.parameters()]
    with frozen_parameters(net):
        assert not any(p.requires_grad for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == before
    with pytest.raises(RuntimeError, match="boom"), frozen_parameters(net):
        raise RuntimeError("boom")
    assert [p.requires_grad for p in net.parameters()] == before


# -- ODIN -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [math.inf, 2.0])
def test_odin_chunked_equals_unchunked(dtype: torch.dtype, p: float) -> None:
    net = make_net(dtype=dtype)
    x = _data(11, dtype)
    rnet = Recorder(net, input_data=x[[0]])
    params = {"temperature": 2.0, "epsilon": 0.05, "fgm_norm": p}
    one_shot = ODIN(**params, max_batch=None).fit(rnet, x)
    out_ref, conf_ref = one_shot(x)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for max_batch in (1, 4, 11, 64):
        out, conf = ODIN(**params, max_batch=max_batch).fit(rnet, x)(x)
        torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(conf, conf_ref, rtol=tol, atol=tol)
    if dtype == torch.float64:  # and both equal the independent per-sample computation
        expected = naive_odin(net, x, 2.0, 0.05, p)
        torch.testing.assert_close(ODIN(**params, max_batch=3).fit(rnet, x)(x)[1], expected)


def test_odin_three_passes_frozen_parameters_and_flags_restored() -> None:
    net = make_net(dtype=torch.float64)
    net.fc.bias.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    x = _data(10)
    x.requires_grad_(False)
    saved = x.clone()
    rnet = Recorder(net, input_data=x[[0]])
    score = ODIN(temperature=1.0, epsilon=0.1, max_batch=4).fit(rnet, x)
    log = _PassLog(net)
    out, _ = score(x)
    # per chunk: one forward with graph (gives `out`) and one perturbed forward, no fourth
    assert log.sizes == [4, 4, 4, 4, 2, 2]
    assert log.grad_forwards == [[False] * len(flags)] * 3  # parameters frozen meanwhile
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(x, saved)
    assert not x.requires_grad
    assert not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, net(x))
    net.train()  # the train/eval mode is restored too
    with pytest.warns(UserWarning, match="training mode"):
        score(x)
    assert all(module.training for module in net.modules())
    assert [p.requires_grad for p in net.parameters()] == flags


def test_odin_max_batch_param() -> None:
    net = make_net()
    x = _data(4, torch.float32)
    rnet = Recorder(net, input_data=x[[0]])
    score = ODIN(temperature=1.0, epsilon=0.1).fit(rnet, x)
    assert score.max_batch == DEFAULT_MAX_BATCH
    assert repr(score) == (
        "ODIN[fit](act_norm=None, mode='raw', temperature=1.0, epsilon=0.1, fgm_norm=inf)"
    )
    score.max_batch = 2  # inference-only: stays fit
    assert score.is_fit
    assert "max_batch=2" in repr(score)
    with pytest.raises(
        ValueError, match=r"`max_batch` of ODIN must be an integer >= 1 \(or None\) \(got 0\)"
    ):
        score.max_batch = 0  # checked at assignment (docs/errors.md)
    with pytest.raises(ValueError, match="`max_batch`"):
        ODIN(temperature=1.0, max_batch=-1)


# -- DeepMahalanobis --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mahalanobis_eps_chunked_equals_unchunked(dtype: torch.dtype) -> None:
    net = make_net(dtype=dtype, seed=1)
    calib = _data(40, dtype, seed=1)
    labels = torch.arange(40) % 3
    test = _data(9, dtype, seed=2)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 3), (1, 5))  # two layers: one backward and one forward each
    one_shot = DeepMahalanobis(epsilon=0.01, max_batch=None).fit(rnet, calib, labels)
    out_ref, conf_ref = one_shot(test)
    tol = {torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    for max_batch in (1, 4, 9):
        one_shot.max_batch = max_batch  # inference-only: stays fit
        assert one_shot.is_fit
        out, conf = one_shot(test)
        torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(conf, conf_ref, rtol=tol, atol=tol * float(conf_ref.abs().max()))
    assert "max_batch=9" in repr(one_shot)
    assert "max_batch" not in repr(DeepMahalanobis())


def test_mahalanobis_eps_passes_and_flags() -> None:
    net = make_net(dtype=torch.float64, seed=1)
    net.conv.weight.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    calib = _data(30, seed=1)
    labels = torch.arange(30) % 3
    test = _data(5, seed=2)
    saved = test.clone()
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 3), (1, 5))
    score = DeepMahalanobis(epsilon=0.01, max_batch=3).fit(rnet, calib, labels)
    log = _PassLog(net)
    score(test)
    # per chunk: the graph forward, then one perturbed forward per recorded layer
    assert log.sizes == [3, 3, 3, 2, 2, 2]
    assert log.grad_forwards == [[False] * len(flags)] * 2
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(test, saved)
    assert not test.requires_grad


# -- Odds -------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_sample_draws", [False, True])
def test_odds_chunked_equals_one_shot(
    monkeypatch: pytest.MonkeyPatch, per_sample_draws: bool
) -> None:
    if per_sample_draws:  # the draw pattern used off CPU, where generators do not split
        monkeypatch.setattr(odds_module, "_splits_exactly", lambda device: False)
    net = make_net(dtype=torch.float64, seed=2)
    calib = _data(17, seed=3)
    labels = torch.arange(17) % 2
    test = _data(6, seed=4)
    rnet = Recorder(net, input_data=calib[[0]])
    params = {"epsilon": 0.3, "noise_samples": 7, "rng_seed": 5}
    one_shot = Odds(**params, max_batch=17 * 7).fit(rnet, calib, labels)
    state = one_shot.rng_state.clone()
    expected = one_shot(test)[1]
    for max_batch in (1, 3, 7, 50):
        score = Odds(**params, max_batch=max_batch).fit(rnet, calib, labels)
        assert torch.equal(score.rng_state, state)  # the same draws were consumed
        torch.testing.assert_close(score.avg, one_shot.avg, rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(score.var, one_shot.var, rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(score(test)[1], expected, rtol=1e-9, atol=1e-9)


def test_odds_passes_bounded_and_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    net = make_net(seed=2)
    calib = _data(8, torch.float32, seed=3)
    labels = torch.arange(8) % 3
    test = _data(5, torch.float32, seed=4)
    saved = test.clone()
    rnet = Recorder(net, input_data=calib[[0]])
    for noise_samples in (3, 40):
        score = Odds(epsilon=0.1, noise_samples=noise_samples, max_batch=16)
        score.fit(rnet, calib, labels)
        log = _PassLog(net)
        score(test)
        log.handle.remove()
        noisy = log.sizes[1:]  # the first forward is the clean one
        assert log.sizes[0] == 5
        assert max(noisy) <= 16  # memory: one chunk of copies, whatever noise_samples
        assert sum(noisy) == 5 * noise_samples  # time: linear in noise_samples
    assert torch.equal(test, saved)
    # the default bound is in input elements (here 16 per copy)
    monkeypatch.setattr(odds_module, "_MAX_NOISY_ELEMENTS", 16 * 10)
    score = Odds(epsilon=0.1, noise_samples=40).fit(rnet, calib, labels)
    log = _PassLog(net)
    score(test)
    assert max(log.sizes[1:]) == 10
    score.max_batch = 4  # a memory bound only: stays fit
    assert score.is_fit
    assert "max_batch=4" in repr(score)
    assert "max_batch" not in repr(Odds(epsilon=0.1))


# -- FeatureSqueezing -------------------------------------------------------------------------
def test_featuresqueezing_chunked_equals_one_shot() -> None:
    net = make_net(dtype=torch.float64, seed=4)
    x = torch.rand(13, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    saved = x.clone()
    rnet = Recorder(net, input_data=x[[0]])
    squeezers = ("bits:2", "median:2", lambda t: t.clamp(0.2, 0.8))
    one_shot = FeatureSqueezing(squeezers=squeezers).fit(rnet, x)
    out_ref, expected = one_shot(x)
    # independent check: per-sample float64 loop
    rows = []
    with torch.no_grad():
        for sample in x:
            p = torch.softmax(net(sample[None]), dim=1)[0]
            dists = []
            for fn in one_shot.squeezers_fn:
                q = torch.softmax(net(fn(sample[None])), dim=1)[0]
                dists.append(float((p - q).abs().sum()))
            rows.append(-max(dists))
    torch.testing.assert_close(expected[:, 0], torch.tensor(rows, dtype=torch.float64))
    for max_batch in (1, 4, 13):
        score = FeatureSqueezing(squeezers=squeezers, max_batch=max_batch).fit(rnet, x)
        log = _PassLog(net)
        out, conformity = score(x)
        log.handle.remove()
        assert log.sizes[0] == 13  # the plain forward on the caller's batch
        assert max(log.sizes[1:]) <= max_batch
        assert sum(log.sizes[1:]) == 13 * len(squeezers)
        torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(conformity, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, saved)
    score.max_batch = 2  # a memory bound only: stays fit
    assert score.is_fit
    assert "max_batch=2" in repr(score)


@pytest.mark.parametrize(
    "name", ["ODIN", "IODIN", "AdaScale", "Odds", "FeatureSqueezing", "DeepMahalanobis"]
)
def test_max_batch_keeps_the_fit_and_is_still_range_checked(name: str) -> None:
    from tests.catalogue import BY_NAME

    from scio.scores.core.validation import ParamError

    entry = BY_NAME[name]
    net = make_net(dtype=torch.float32)
    calib = torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record(*entry.layers)
    with torch.no_grad():
        labels = net(calib).argmax(1)
    score = entry.make().fit(rnet, calib, labels if entry.uses_labels else None)
    score.max_batch = 3
    assert score.is_fit
    with pytest.raises(ParamError, match="max_batch"):
        score.max_batch = 0
    assert score.is_fit and score.max_batch == 3
