"""SHE against an independent float64 computation of the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores import SHE
from scio.scores.classification.she import she_conformity


def _features(net: nn.Module, x: Tensor) -> tuple[list[list[float]], list[list[float]]]:
    with torch.no_grad():
        feats = net.flatten(net.pool(net.softplus(net.conv(x))))
        logits = net.fc(feats)
    return feats.double().tolist(), logits.double().tolist()


def _argmax(row: list[float]) -> int:
    return max(range(len(row)), key=lambda c: row[c])


def _similarity(x: list[float], s: list[float], metric: str) -> float:
    dot = sum(a * b for a, b in zip(x, s, strict=True))
    if metric == "inner_product":
        return dot
    if metric == "euclidean":
        return -math.sqrt(sum((a - b) ** 2 for a, b in zip(x, s, strict=True)))
    norms = max(math.sqrt(sum(a * a for a in x)), 1e-8) * max(
        math.sqrt(sum(b * b for b in s)), 1e-8
    )
    return dot / norms


def _naive(
    calib: tuple[list, list],
    labels: list[int],
    test: tuple[list, list],
    metric: str = "inner_product",
) -> list:
    patterns: dict[int, list[float]] = {}
    for c in set(labels):
        rows = [f for f, z, y in zip(*calib, labels, strict=True) if y == c and _argmax(z) == c]
        if rows:
            patterns[c] = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
    result = []
    for feats, logits in zip(*test, strict=True):
        pred = _argmax(logits)
        if pred in patterns:
            result.append(_similarity(feats, patterns[pred], metric))
        else:
            result.append(-math.inf)
    return result


@pytest.mark.parametrize("dtype", DTYPES)
def test_she_matches_naive(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    net = make_net(dtype=dtype, n_classes=3, seed=1)  # predicts every class on these inputs
    calib = (3 * torch.randn(60, 1, 4, 4, generator=generator)).to(dtype)
    test = (3 * torch.randn(9, 1, 4, 4, generator=generator)).to(dtype)
    with torch.no_grad():  # labels = predictions, except every 4th: all classes have a pattern
        labels = net(calib).argmax(dim=1)
    labels[::4] = (labels[::4] + 1) % 3
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    score = SHE().fit(rnet, calib, labels)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (9, 3)
    assert torch.equal(conformity[:, 0], conformity[:, 2])
    assert len(set(out.argmax(dim=1).tolist())) > 1
    expected = _naive(_features(net, calib), labels.tolist(), _features(net, test))
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(
        conformity[:, 0].double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=tol
    )
    streamed = SHE().fit(rnet, DataLoader(TensorDataset(calib, labels), batch_size=7))
    torch.testing.assert_close(streamed(test)[1], conformity, atol=tol, rtol=tol)


def test_she_absent_class_falls_back_with_a_warning() -> None:
    templates = torch.tensor([[1.0, 2.0], [math.nan, math.nan]], dtype=torch.float64)
    features = torch.tensor([[3.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        she_conformity(logits, features, templates),
        torch.tensor([5.0, -math.inf], dtype=torch.float64),
    )
    net = make_net(seed=1)
    calib = 3 * torch.randn(60, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = net(calib).argmax(dim=1)
    labels[labels == 2] = 0  # class 2 never correctly predicted
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    with pytest.warns(UserWarning, match=r"1 class\(es\) have no correctly predicted .*\(2\)"):
        score = SHE().fit(rnet, calib, labels)
    assert torch.isnan(score.templates[2]).all()
    assert not torch.isnan(score.templates[:2]).any()
    predicted_2 = calib[net(calib).argmax(dim=1) == 2]
    assert len(predicted_2)
    for mode in ("raw", "diff", "ratio"):  # the -inf fallback never turns into NaN
        score.mode = mode
        conformity = score(predicted_2)[1]
        assert not conformity.isnan().any()
        assert (conformity == (-math.inf if mode == "raw" else 0 if mode == "diff" else 1)).all()
    with pytest.raises(TypeError, match="calib_labels"):
        SHE().fit(rnet, calib, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_she_metrics_match_naive_and_keep_fit(dtype: torch.dtype, metric: str) -> None:
    generator = torch.Generator().manual_seed(0)
    net = make_net(dtype=dtype, n_classes=3, seed=1)
    calib = (3 * torch.randn(60, 1, 4, 4, generator=generator)).to(dtype)
    test = (3 * torch.randn(9, 1, 4, 4, generator=generator)).to(dtype)
    with torch.no_grad():
        labels = net(calib).argmax(dim=1)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record((1, 4))
    score = SHE().fit(rnet, calib, labels)
    assert score.metric == "inner_product" and "metric" not in repr(score)  # OpenOOD's default
    score.metric = metric  # used at inference only: the score stays fit
    assert score.is_fit
    _, conformity = score(test)
    expected = _naive(_features(net, calib), labels.tolist(), _features(net, test), metric)
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(
        conformity[:, 0].double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=tol
    )
    with pytest.raises(ValueError, match=r"`metric` must be one of \('inner_product'"):
        score.metric = "l1"
