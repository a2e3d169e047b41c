"""OpenMax against a naive float64 implementation (scipy's generic Weibull fit), its
vectorised Weibull fit and tail selection, the missing-class fallback and its checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from tests.conftest import DTYPES, make_net
from tests.scores.test_entropy import identity_net
from torch import Tensor

from scio.recorder import Recorder
from scio.scores import OpenMax
from scio.scores.classification.openmax import fit_weibull, tail_distances


def _tight_fmin(func, x0, args=(), disp=0):  # type: ignore[no-untyped-def]
    return optimize.fmin(func, x0, args=args, xtol=1e-13, ftol=1e-13, disp=disp, maxiter=20000)


def scipy_weibull(values: list[float]) -> tuple[float, float]:
    """(shape, scale) of scipy's generic maximum-likelihood fit, location fixed at 0."""
    shape, _, scale = stats.weibull_min.fit(values, floc=0, optimizer=_tight_fmin)
    return float(shape), float(scale)


def _distance(a: list[float], b: list[float], kind: str) -> float:
    euclid = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    cosine = 1 - dot / norms
    return {"euclidean": euclid, "cosine": cosine, "eucos": euclid / 200 + cosine}[kind]


def naive_openmax(
    calib: Tensor,
    labels: Tensor,
    test: Tensor,
    tailsize: int,
    alpha: int,
    kind: str,
    libmr: bool = False,
) -> Tensor:
    """Recalibrated class probabilities P̂_1..P̂_C, written from the paper with loops
    (``libmr``: each tail, and the distances to its class, translated by 1 - min(tail))."""
    rows, ys = calib.double().tolist(), labels.tolist()
    n_classes = len(rows[0])
    models: dict[int, tuple[list[float], float, float, float]] = {}
    for c in range(n_classes):
        correct = [r for r, y in zip(rows, ys, strict=True) if y == c and r.index(max(r)) == c]
        if len(correct) < 2:
            continue
        mav = [sum(col) / len(correct) for col in zip(*correct)]
        tail = sorted((_distance(r, mav, kind) for r in correct), reverse=True)[:tailsize]
        shift = 1 - min(tail) if libmr else 0.0
        models[c] = (mav, *scipy_weibull([t + shift for t in tail]), shift)
    alpha = min(alpha, n_classes)
    result = []
    for v in test.double().tolist():
        ranked = sorted(range(n_classes), key=lambda c: -v[c])[:alpha]
        omega = [1.0] * n_classes
        for i, c in enumerate(ranked):
            if c in models:
                mav, shape, scale, shift = models[c]
                distance = max(_distance(v, mav, kind) + shift, 0.0)
                cdf = 1 - math.exp(-((distance / scale) ** shape))
            else:
                cdf = 1.0
            omega[c] = 1 - (alpha - i) / alpha * cdf
        revised = [v[c] * omega[c] for c in range(n_classes)]
        unknown = sum(v[c] * (1 - omega[c]) for c in range(n_classes))
        logits = [unknown, *revised]
        top = max(logits)
        weights = [math.exp(z - top) for z in logits]
        result.append([w / sum(weights) for w in weights[1:]])
    return torch.tensor(result, dtype=torch.float64)


def _hand_made(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 1.0, 0.0], [0.5, 3.0, 1.0], [0.0, 1.0, 3.5]])
    labels = torch.arange(3).repeat(30)
    calib = centres[labels] + 1.2 * torch.randn(90, 3, generator=generator)
    test = torch.cat([centres, 3 * torch.randn(9, 3, generator=generator)])
    return calib, labels, test


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tailsize", "alpha", "kind"),
    [(10, 2, "euclidean"), (25, 3, "eucos"), (4, 1, "cosine"), (50, 10, "euclidean")],
)
def test_openmax_matches_naive(dtype: torch.dtype, tailsize: int, alpha: int, kind: str) -> None:
    calib, labels, test = _hand_made()
    calib, test = calib.to(dtype), test.to(dtype)
    rnet = Recorder(identity_net(3, dtype), input_data=calib[[0]])
    score = OpenMax(tailsize=tailsize, alpha=alpha, distance=kind).fit(rnet, calib, labels)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (12, 3)
    assert bool(score.weibull_fitted.all())
    expected = naive_openmax(calib, labels, test, tailsize, alpha, kind)
    tol = {torch.float16: 3e-3, torch.float32: 1e-5, torch.float64: 1e-7}[dtype]
    torch.testing.assert_close(conformity.double(), expected, atol=tol, rtol=0)
    assert bool((conformity.sum(dim=1) <= 1 + tol).all())  # the unknown class takes the rest


def test_far_inputs_are_less_confident() -> None:
    calib, labels, _ = _hand_made()
    rnet = Recorder(identity_net(3, torch.float64), input_data=calib[[0]].double())
    score = OpenMax(tailsize=20, alpha=3).fit(rnet, calib.double(), labels)
    near = torch.tensor([[4.0, 1.0, 0.0]], dtype=torch.float64)
    far = torch.tensor([[40.0, 10.0, 0.0]], dtype=torch.float64)  # same argmax, far from μ_0
    _, conformity = score(torch.cat([near, far]))
    assert float(conformity[0, 0]) > 0.5 > float(conformity[1, 0])


def test_fit_weibull_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    shapes, scales = np.array([0.7, 1.5, 3.0, 8.0]), np.array([0.01, 2.0, 5.0, 300.0])
    data = stats.weibull_min.rvs(
        shapes[:, None], scale=scales[:, None], size=(4, 25), random_state=rng
    )
    data[1, 12:] = np.nan  # a class with fewer samples than the tail size
    tail = np.vstack([data, np.full((2, 25), np.nan)])
    tail[4, 0] = 1.0  # one value: no model
    tail[5, :3] = 2.0  # equal values: no model
    shape, scale, fitted = fit_weibull(tail)
    assert fitted.tolist() == [True] * 4 + [False] * 2
    assert np.isnan(shape[4:]).all()
    assert np.isnan(scale[4:]).all()
    for i in range(4):
        expected_shape, expected_scale = scipy_weibull(data[i][~np.isnan(data[i])].tolist())
        assert shape[i] == pytest.approx(expected_shape, rel=1e-6)
        assert scale[i] == pytest.approx(expected_scale, rel=1e-6)


def test_tail_distances_keeps_the_largest_per_class() -> None:
    distances = torch.tensor([0.5, 3.0, 1.0, 2.0, 4.0, 0.1, 7.0], dtype=torch.float64)
    labels = torch.tensor([0, 0, 2, 0, 2, 2, 0])
    tail = tail_distances(distances, labels, 4, 3)
    expected = torch.tensor(
        [[7.0, 3.0, 2.0], [math.nan] * 3, [4.0, 1.0, 0.1], [math.nan] * 3], dtype=torch.float64
    )
    torch.testing.assert_close(tail, expected, equal_nan=True, rtol=0, atol=0)


def test_class_without_model_warns_and_is_an_outlier() -> None:
    calib, labels, test = _hand_made()
    keep = labels != 2
    calib, labels = calib[keep].double(), labels[keep]
    rnet = Recorder(identity_net(3, torch.float64), input_data=calib[[0]])
    with pytest.warns(UserWarning, match=r"OpenMax: class\(es\) \[2\] have fewer than two"):
        score = OpenMax(tailsize=10, alpha=3).fit(rnet, calib, labels)
    assert score.weibull_fitted.tolist() == [True, True, False]
    assert bool(score.mav[2].isnan().all())
    _, conformity = score(test.double())
    expected = naive_openmax(calib, labels, test, 10, 3, "euclidean")
    torch.testing.assert_close(conformity, expected, atol=1e-7, rtol=0)
    assert float(conformity[2, 2]) < 0.05  # the centre of class 2 is an outlier of class 2


def test_openmax_on_a_conv_net_uses_only_correct_samples() -> None:
    generator = torch.Generator().manual_seed(2)
    net = make_net()
    calib = torch.rand(60, 1, 4, 4, generator=generator)
    with torch.no_grad():
        logits = net(calib)
    labels = logits.argmax(dim=1)
    wrong = labels.clone()
    wrong[:10] = (labels[:10] + 1) % 3  # wrong labels: these samples must be left out
    rnet = Recorder(net, input_data=calib[[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes the random net never predicts
        score = OpenMax(tailsize=8, alpha=2).fit(rnet, calib, wrong)
        subset = OpenMax(tailsize=8, alpha=2).fit(rnet, calib[10:], labels[10:])
    torch.testing.assert_close(score.mav, subset.mav, equal_nan=True)
    torch.testing.assert_close(score.weibull_scale, subset.weibull_scale, equal_nan=True)


def test_openmax_parameter_checks() -> None:
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match=r"`tailsize` must be an integer >= 2"):
            OpenMax(tailsize=bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"`alpha` must be an integer >= 1"):
            OpenMax(alpha=bad)
    for name, bad in (("tailsize", 2.5), ("tailsize", None), ("alpha", 1.0), ("alpha", False)):
        with pytest.raises(TypeError, match=f"`{name}`"):
            OpenMax(**{name: bad})
    with pytest.raises(ValueError, match=r"`distance` must be one of \('euclidean', 'cosine'"):
        OpenMax(distance="manhattan")
    calib, _, _ = _hand_made()
    rnet = Recorder(identity_net(3, torch.float32), input_data=calib[[0]])
    with pytest.raises(TypeError, match="`calib_labels` must be a 1-D integer tensor"):
        OpenMax().fit(rnet, calib, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_openmax_unknown_readout_is_the_negated_unknown_probability(dtype: torch.dtype) -> None:
    calib, labels, test = _hand_made()
    calib, test = calib.to(dtype), test.to(dtype)
    rnet = Recorder(identity_net(3, dtype), input_data=calib[[0]])
    score = OpenMax(tailsize=20, alpha=3).fit(rnet, calib, labels)
    assert score.readout == "class" and "readout" not in repr(score)
    classes = score(test)[1]
    score.readout = "unknown"  # a read-out: the score stays fit
    assert score.is_fit and "readout='unknown'" in repr(score)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype and conformity.shape == (12, 3)
    assert torch.equal(conformity[:, 0], conformity[:, 2])
    known = naive_openmax(calib, labels, test, 20, 3, "euclidean")
    expected = -(1 - known.sum(dim=1))  # -P̂_0: the unknown class takes the rest
    tol = {torch.float16: 3e-3, torch.float32: 1e-5, torch.float64: 1e-7}[dtype]
    torch.testing.assert_close(conformity[:, 1].double(), expected, atol=tol, rtol=0)
    torch.testing.assert_close(
        conformity[:, 0].double(), classes.double().sum(dim=1) - 1, atol=2 * tol, rtol=0
    )
    with pytest.raises(ValueError, match=r"`readout` must be one of \('class', 'unknown'\)"):
        score.readout = "softmax"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_openmax_libmr_weibull_matches_naive(dtype: torch.dtype) -> None:
    """libMR's FitHigh (the authors' and OpenOOD's): the same fit on translated tails."""
    calib, labels, test = _hand_made(1)
    calib, test = calib.to(dtype), test.to(dtype)
    rnet = Recorder(identity_net(3, dtype), input_data=calib[[0]])
    score = OpenMax(tailsize=20, alpha=3, weibull="libmr").fit(rnet, calib, labels)
    assert "weibull='libmr'" in repr(score)
    assert bool((score.weibull_shift < 1).all()) and bool(score.weibull_fitted.all())
    expected = naive_openmax(calib, labels, test, 20, 3, "euclidean", libmr=True)
    tol = {torch.float32: 1e-5, torch.float64: 1e-7}[dtype]
    torch.testing.assert_close(score(test)[1].double(), expected, atol=tol, rtol=0)
    plain = naive_openmax(calib, labels, test, 20, 3, "euclidean")
    assert (expected - plain).abs().max() > 1e-3  # the translation changes the model
    score.weibull = "mle"  # a calibration parameter: the score is unfit
    assert not score.is_fit
    with pytest.raises(ValueError, match=r"`weibull` must be one of \('mle', 'libmr'\)"):
        OpenMax(weibull="scipy")
