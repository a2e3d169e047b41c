"""KLM against a naive float64 KL matching, its KL direction and the absent-class fallback."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from tests.conftest import DTYPES, make_net
from tests.scores.test_entropy import identity_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores import KLM

TOL = {torch.float16: 5e-3, torch.float32: 1e-5, torch.float64: 1e-11}


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    weights = [math.exp(z - top) for z in row]
    return [w / sum(weights) for w in weights]


def naive_klm(calib_logits: Tensor, test_logits: Tensor) -> tuple[dict[int, list[float]], Tensor]:
    """Templates (mean posterior of the samples predicted as each class) and
    -min_k KL(p || d_k), with Python floats."""
    groups: dict[int, list[list[float]]] = {}
    for row in calib_logits.double().tolist():
        groups.setdefault(row.index(max(row)), []).append(_softmax(row))
    templates = {k: [sum(col) / len(rows) for col in zip(*rows)] for k, rows in groups.items()}
    result = []
    for row in test_logits.double().tolist():
        p = _softmax(row)
        kls = [
            sum(pc * (math.log(pc) - math.log(dc)) for pc, dc in zip(p, d, strict=True) if pc > 0)
            for d in templates.values()
        ]
        result.append(-min(kls))
    return templates, torch.tensor(result, dtype=torch.float64)


def _hand_made(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    centres = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 2.5, 1.5]])
    calib = centres.repeat(8, 1) + torch.randn(24, 4, generator=generator)
    test = torch.cat([centres, 4 * torch.randn(5, 4, generator=generator)])
    return calib, test


@pytest.mark.parametrize("dtype", DTYPES)
def test_klm_matches_naive_kl_matching(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    calib, test = _hand_made(generator)
    calib, test = calib.to(dtype), test.to(dtype)
    rnet = Recorder(identity_net(4, dtype), input_data=calib[[0]])
    score = KLM().fit(rnet, calib, None)
    out, conformity = score(test)
    assert out.dtype == conformity.dtype == dtype
    assert conformity.shape == (8, 4)
    templates, expected = naive_klm(calib, test)
    assert score.template_classes.tolist() == sorted(templates)
    naive_templates = torch.tensor([templates[k] for k in sorted(templates)], dtype=torch.float64)
    torch.testing.assert_close(score.templates, naive_templates, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(conformity[:, 3].double(), expected, atol=TOL[dtype], rtol=1e-3)
    assert bool((conformity <= 1e-6).all())


def test_klm_direction_is_test_posterior_first() -> None:
    """KL(p || d) and KL(d || p) differ here: the score must use the former."""
    template = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    calib = template.log()  # one sample, predicted as class 0: template = itself
    test = torch.tensor([[0.1, 2.0, -1.0]], dtype=torch.float64)
    rnet = Recorder(identity_net(3, torch.float64), input_data=calib)
    with pytest.warns(UserWarning, match=r"class\(es\) \[1, 2\]"):
        score = KLM().fit(rnet, calib, None)
    _, conformity = score(test)
    p = torch.softmax(test, dim=1)[0]
    d = template[0]
    forward = float((p * (p / d).log()).sum())
    backward = float((d * (d / p).log()).sum())
    assert abs(forward - backward) > 0.05
    assert float(conformity[0, 0]) == pytest.approx(-forward, rel=1e-12)


def test_klm_absent_class_warns_and_is_skipped() -> None:
    calib = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    test = torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    rnet = Recorder(identity_net(3, torch.float64), input_data=calib[[0]])
    with pytest.warns(UserWarning, match=r"predicted as class\(es\) \[2\]"):
        score = KLM().fit(rnet, calib, None)
    assert score.template_classes.tolist() == [0, 1]
    _, conformity = score(test)
    _, expected = naive_klm(calib, test)
    torch.testing.assert_close(conformity[:, 0], expected, atol=1e-12, rtol=0)
    assert bool(conformity.isfinite().all())


def test_klm_streams_running_sums_and_ignores_labels() -> None:
    generator = torch.Generator().manual_seed(1)
    net = make_net()
    calib = torch.rand(30, 1, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (30,), generator=generator)
    test = torch.rand(6, 1, 4, 4, generator=generator)
    rnet = Recorder(net, input_data=calib[[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the absent-class warning is tested above
        whole = KLM().fit(rnet, calib, labels)
        streamed = KLM().fit(rnet, DataLoader(TensorDataset(calib, labels), batch_size=4))
        no_labels = KLM().fit(rnet, calib, None)
    torch.testing.assert_close(streamed.templates, whole.templates, rtol=1e-12, atol=1e-12)
    assert torch.equal(no_labels.templates, whole.templates)
    with torch.no_grad():
        _, expected = naive_klm(net(calib), net(test))
    torch.testing.assert_close(whole(test)[1][:, 0].double(), expected, atol=1e-5, rtol=1e-3)
