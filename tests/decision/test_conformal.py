"""ConformalDetector on a tiny network: life cycle, decisions, errors, files."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from tests.conftest import make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.decision import MIN_HOLDOUT, ConformalDetector, DetectorFileError
from scio.recorder import Recorder
from scio.scores import KNN, Energy, Softmax


def _inputs(n: int, seed: int) -> Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def _softmax(net: torch.nn.Module) -> Softmax:
    calib = _inputs(30, 0)
    return Softmax().fit(Recorder(net, input_data=calib[:1]), calib)  # type: ignore[return-value]


def _knn(net: torch.nn.Module) -> KNN:
    calib = _inputs(30, 0)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    return KNN(k=3).fit(rnet, calib, torch.zeros(30, dtype=torch.int64))  # type: ignore[return-value]


def _energy(net: torch.nn.Module) -> Energy:
    calib = _inputs(30, 0)
    return Energy().fit(Recorder(net, input_data=calib[:1]), calib)  # type: ignore[return-value]


def _predicted_conformity(score: object, x: Tensor) -> Tensor:
    out, conf = score(x)  # type: ignore[operator]
    return conf.gather(1, out.argmax(1, keepdim=True)).squeeze(1).double()


def naive_p(holdout: list[float], test: list[float]) -> list[float]:
    return [(1 + sum(h <= s for h in holdout)) / (len(holdout) + 1) for s in test]


def test_p_values_match_naive_and_predict_matches_threshold() -> None:
    net = make_net()
    score = _softmax(net)
    holdout, test = _inputs(199, 1), _inputs(300, 2)
    det = ConformalDetector(score).fit(holdout)
    assert det.n_holdout == 199
    h = _predicted_conformity(score, holdout).tolist()
    s = _predicted_conformity(score, test)
    p = det.p_values(test)
    assert p.dtype == torch.float64 and p.shape == (300,)
    assert p.tolist() == naive_p(h, s.tolist())
    for alpha in (0.05, 0.1, 0.5):
        flags = det.predict(test, alpha=alpha)
        assert torch.equal(flags, p <= alpha)
        cut = det.threshold(alpha)
        assert cut.shape == (1,)
        assert torch.equal(flags, s < cut[0])


def test_holdout_forms_give_the_same_state() -> None:
    net = make_net()
    score = _softmax(net)
    holdout = _inputs(60, 3)
    labels = torch.zeros(60, dtype=torch.int64)
    ref = ConformalDetector(score).fit(holdout).holdout_conformities_
    loaders = [
        DataLoader(TensorDataset(holdout, labels), batch_size=7),  # (inputs, labels) batches
        [holdout[i : i + 9] for i in range(0, 60, 9)],  # bare input batches
    ]
    for data in loaders:
        state = ConformalDetector(score).fit(data).holdout_conformities_
        torch.testing.assert_close(state, ref, rtol=0, atol=1e-6)
    split = ConformalDetector(score).fit(holdout, batch_size=11).holdout_conformities_
    torch.testing.assert_close(split, ref, rtol=0, atol=1e-6)


def test_inputs_are_not_mutated_and_net_is_untouched() -> None:
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    holdout, test = _inputs(40, 4), _inputs(10, 5)
    h0, t0 = holdout.clone(), test.clone()
    det = ConformalDetector(_softmax(net)).fit(holdout)
    det.predict(test, 0.1)
    assert torch.equal(holdout, h0) and torch.equal(test, t0)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_several_scores_use_one_shared_forward_and_combine() -> None:
    net = make_net()
    s1, s2 = _softmax(net), _knn(net)
    holdout, test = _inputs(100, 6), _inputs(50, 7)
    calls = 0

    def count(_: object, args: tuple[Tensor, ...], __: object) -> None:
        nonlocal calls
        calls += len(args[0]) > 1  # not the one-sample probe building the shared recorder

    handle = net.register_forward_hook(count)
    det = ConformalDetector([s1, s2], combine="bonferroni").fit(holdout)
    assert calls == 1  # one forward for both scores
    p = det.p_values(test)
    assert calls == 2
    handle.remove()
    p1 = torch.tensor(
        naive_p(
            _predicted_conformity(s1, holdout).tolist(), _predicted_conformity(s1, test).tolist()
        ),
        dtype=torch.float64,
    )
    p2 = torch.tensor(
        naive_p(
            _predicted_conformity(s2, holdout).tolist(), _predicted_conformity(s2, test).tolist()
        ),
        dtype=torch.float64,
    )
    ref = torch.minimum(p1, p2).mul(2).clamp(max=1)
    torch.testing.assert_close(p, ref, rtol=1e-12, atol=0)
    # Bonferroni cuts: flagged iff below the cut of any score
    cuts = det.threshold(0.1)
    assert cuts.shape == (2,)
    below = (_predicted_conformity(s1, test) < cuts[0]) | (
        _predicted_conformity(s2, test) < cuts[1]
    )
    assert torch.equal(det.predict(test, 0.1), below)
    harmonic = ConformalDetector([s1, s2, _energy(net)], combine="harmonic").fit(holdout)
    assert bool(((harmonic.p_values(test) > 0) & (harmonic.p_values(test) <= 1)).all())
    with pytest.raises(ValueError, match="threshold\\(\\) needs one score or combine='bonferroni'"):
        harmonic.threshold(0.1)


def test_scores_on_different_networks() -> None:
    s1, s2 = _softmax(make_net(seed=0)), _softmax(make_net(seed=1))
    det = ConformalDetector([s1, s2]).fit(_inputs(40, 8))
    assert det.p_values(_inputs(5, 9)).shape == (5,)


def test_class_conditional_mode() -> None:
    net = make_net(seed=1)  # predicts the 3 classes on inputs in [0, 3): 67 / 221 / 312
    score = _softmax(net)
    holdout, test = 3 * _inputs(600, 10), 3 * _inputs(200, 11)
    det = ConformalDetector(score, class_conditional=True).fit(holdout)
    out, _ = score(holdout)
    hc = out.argmax(1)
    h = _predicted_conformity(score, holdout)
    out_t, _ = score(test)
    tc = out_t.argmax(1)
    s = _predicted_conformity(score, test)
    ref = [
        (1 + int(((h <= v) & (hc == c)).sum())) / (1 + int((hc == c).sum()))
        for v, c in zip(s.tolist(), tc.tolist())
    ]
    assert det.p_values(test).tolist() == ref
    cuts = det.threshold(0.1)
    assert cuts.shape == (1, 3)
    assert torch.equal(det.predict(test, 0.1), s < cuts[0, tc])


def test_class_with_too_few_holdout_samples() -> None:
    net = make_net(seed=1)
    score = _softmax(net)
    holdout = 3 * _inputs(600, 10)
    out, _ = score(holdout)
    classes = out.argmax(1)
    counts = torch.bincount(classes, minlength=3)
    rare = int(counts.argmin())
    # keep only 20 inputs of the rarest class: enough to fit, too few for alpha = 0.01
    keep = torch.cat(
        [(classes != rare).nonzero().flatten(), (classes == rare).nonzero().flatten()[:20]]
    )
    det = ConformalDetector(score, class_conditional=True).fit(holdout[keep])
    with pytest.raises(ValueError, match=rf"classes \{{{rare}: 20\}}.*at least 99 holdout inputs"):
        det.predict(holdout[:5], alpha=0.01)
    few = torch.cat(
        [(classes != rare).nonzero().flatten(), (classes == rare).nonzero().flatten()[:3]]
    )
    with pytest.raises(
        ValueError,
        match=rf"at least {MIN_HOLDOUT} holdout inputs predicted in each class; "
        rf"classes \{{{rare}: 3\}}",
    ):
        ConformalDetector(score, class_conditional=True).fit(holdout[few])


def test_errors() -> None:
    net = make_net()
    score = _softmax(net)
    with pytest.raises(ValueError, match=r"`scores\[0\]` \(Softmax\) is not fitted"):
        ConformalDetector(Softmax())
    with pytest.raises(ValueError, match="at least one fitted score"):
        ConformalDetector([])
    with pytest.raises(TypeError, match=r"`scores\[1\]` must be a scio score"):
        ConformalDetector([score, "nope"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="`combine` must be one of"):
        ConformalDetector([score, score], combine="mean")  # type: ignore[arg-type]
    det = ConformalDetector(score)
    for call in (
        lambda: det.predict(_inputs(3, 0)),
        lambda: det.p_values(_inputs(3, 0)),
        lambda: det.threshold(0.1),
    ):
        with pytest.raises(RuntimeError, match="not fitted yet: call `fit"):
            call()
    with pytest.raises(ValueError, match=f"at least {MIN_HOLDOUT} inputs \\(got 18\\)"):
        det.fit(_inputs(18, 0))
    det.fit(_inputs(49, 0))
    for alpha in (0.0, 1.0, -1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"`alpha` must be in \(0, 1\)"):
            det.predict(_inputs(3, 0), alpha=alpha)
    with pytest.raises(ValueError, match=r"n=49 holdout inputs.*at least n=99 holdout inputs"):
        det.predict(_inputs(3, 0), alpha=0.01)
    assert det.predict(_inputs(3, 0), alpha=0.02).shape == (3,)  # 1/(49 + 1) = 0.02 is reachable
    with pytest.raises(ValueError, match="n=99"):
        det.threshold(0.01)


def test_nan_holdout_conformities_are_counted() -> None:
    net = make_net()
    score = _softmax(net)
    holdout = _inputs(30, 12)
    holdout[[2, 5, 7]] = math.nan
    with pytest.raises(ValueError, match="`holdout` has 3 inputs with NaN conformities out of 30"):
        ConformalDetector(score).fit(holdout)


def test_fdr_mode_is_benjamini_hochberg_on_the_p_values() -> None:
    from scio.decision import benjamini_hochberg

    net = make_net()
    det = ConformalDetector(_softmax(net)).fit(_inputs(200, 13))
    test = torch.cat([_inputs(80, 14), _inputs(20, 15) * 8 - 4])
    assert torch.equal(
        det.predict(test, 0.2, fdr=True), benjamini_hochberg(det.p_values(test), 0.2)
    )


def test_randomised_detector_is_seeded() -> None:
    net = make_net()
    score = _softmax(net)
    holdout, test = _inputs(50, 16), _inputs(30, 17)
    a = ConformalDetector(score, randomize=True, seed=3).fit(holdout).p_values(test)
    b = ConformalDetector(score, randomize=True, seed=3).fit(holdout).p_values(test)
    c = ConformalDetector(score).fit(holdout).p_values(test)
    assert torch.equal(a, b)
    assert bool((a <= c).all() and (a < c).any())


def test_repr() -> None:
    net = make_net()
    score = _softmax(net)
    det = ConformalDetector(score, class_conditional=True)
    assert repr(det).startswith("ConformalDetector[unfit](scores=[Softmax[fit]")
    assert "combine='bonferroni', class_conditional=True, randomize=False, seed=0)" in repr(det)
    det = ConformalDetector(score).fit(_inputs(25, 0))
    assert repr(det).startswith("ConformalDetector[fit, n=25]")


@pytest.mark.parametrize("class_conditional", [False, True])
def test_save_load_round_trip(tmp_path: Path, class_conditional: bool) -> None:
    net = make_net(seed=1)
    det = ConformalDetector([_softmax(net), _knn(net)], class_conditional=class_conditional)
    det.fit(3 * _inputs(600, 18))
    path = tmp_path / "detector.pt"
    det.save(path)
    test = 3 * _inputs(40, 19)
    loaded = ConformalDetector.load(path, make_net(seed=1))  # same weights, fresh instance
    assert repr(loaded) == repr(det)
    assert torch.equal(loaded.p_values(test), det.p_values(test))
    assert torch.equal(loaded.threshold(0.1), det.threshold(0.1))
    assert torch.equal(loaded.holdout_classes_, det.holdout_classes_)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_checks(tmp_path: Path) -> None:
    net = make_net()
    det = ConformalDetector(_knn(net)).fit(_inputs(30, 20))
    path = tmp_path / "d.pt"
    det.save(path)
    payload = torch.load(path, weights_only=True)
    for key, value, match in (
        ("format_version", 99, "detector format version 99; this scio reads version 1"),
        ("class", "SplitConformal", "holds a 'SplitConformal' detector, not a ConformalDetector"),
        ("magic", "x", "is not a scio detector file"),
    ):
        bad = dict(payload, **{key: value})
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(DetectorFileError, match=match):
            ConformalDetector.load(tmp_path / "bad.pt", net)
    with (tmp_path / "evil.pt").open("wb") as handle:
        pickle.dump({"magic": object()}, handle)
    with pytest.raises(DetectorFileError):
        ConformalDetector.load(tmp_path / "evil.pt", net)
    from scio.serialization import ScoreFileError

    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    with pytest.raises(ScoreFileError):
        ConformalDetector.load(path, other)
    with pytest.raises(ValueError, match="one network or 1 networks"):
        ConformalDetector.load(path, [net, net])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_network_dtypes(dtype: torch.dtype) -> None:
    net = make_net(dtype=dtype)
    calib = _inputs(30, 0).to(dtype)
    score = Energy().fit(Recorder(net, input_data=calib[:1]), calib)
    holdout, test = _inputs(60, 21).to(dtype), _inputs(20, 22).to(dtype)
    det = ConformalDetector(score).fit(holdout)
    p = det.p_values(test)
    assert p.dtype == torch.float64
    ref = naive_p(
        _predicted_conformity(score, holdout).tolist(), _predicted_conformity(score, test).tolist()
    )
    assert p.tolist() == ref
    assert torch.equal(
        det.predict(test, 0.2), _predicted_conformity(score, test) < det.threshold(0.2)[0]
    )


def test_fit_from_precomputed_conformities() -> None:
    net = make_net(seed=1)
    score = _softmax(net)
    det = ConformalDetector(score, class_conditional=True)
    holdout, test = 3 * _inputs(600, 23), 3 * _inputs(50, 24)
    confs, classes = det.scored(holdout)  # no fit needed to score
    assert confs.shape == (1, 600) and classes.shape == (600,)
    direct = ConformalDetector(score, class_conditional=True).fit(holdout)
    det.fit_conformities(confs, classes, 3)
    assert torch.equal(det.p_values(test), direct.p_values(test))
    t_confs, t_classes = det.scored(test)
    assert torch.equal(det.p_values_from(t_confs, t_classes), direct.p_values(test))
    with pytest.raises(ValueError, match="`classes` \\(predicted classes\\) is needed"):
        ConformalDetector(score, class_conditional=True).fit_conformities(confs)
    with pytest.raises(ValueError, match="`classes` \\(predicted classes\\) is needed"):
        det.p_values_from(t_confs)
    with pytest.raises(ValueError, match=r"`classes` must have shape \(600,\) \(got \(5,\)\)"):
        ConformalDetector(score).fit_conformities(confs, classes[:5])
    marginal = ConformalDetector(score).fit_conformities(confs[0])
    assert marginal.n_holdout == 600


def test_nan_test_conformities_are_counted() -> None:
    net = make_net()
    det = ConformalDetector(_softmax(net)).fit(_inputs(30, 25))
    test = _inputs(6, 26)
    test[[1, 4]] = math.nan
    with pytest.raises(ValueError, match="2 NaN conformities out of 6"):
        det.p_values(test)
