"""IsoMax against a naive float64 computation with a hand-written Adam."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification.isomax import IsoMax
from scio.scores.joint.fit import fit_jointly


def naive_distances(z: Tensor, prototypes: Tensor, p: float) -> Tensor:
    """``(n, C)`` distances by explicit broadcasting over (sample, prototype, coordinate)."""
    diff = (z[:, None, :] - prototypes[None, :, :]).abs()
    return diff.amax(dim=-1) if p == math.inf else (diff**p).sum(dim=-1) ** (1 / p)


def naive_fit(
    logits: Tensor, labels: Tensor, scale: float, p: float, lr: float, n_steps: int
) -> Tensor:
    """Full-batch Adam (betas 0.9, 0.999, eps 1e-8) written out by hand, in float64."""
    z = logits.double()
    n_classes = z.shape[1]
    P = torch.zeros(n_classes, n_classes, dtype=torch.float64)
    m = torch.zeros_like(P)
    v = torch.zeros_like(P)
    for step in range(1, n_steps + 1):
        P.requires_grad_(True)
        modified = -scale * naive_distances(z, P, p)
        log_probs = modified - torch.logsumexp(modified, dim=1, keepdim=True)
        loss = -torch.stack([log_probs[i, int(labels[i])] for i in range(len(z))]).mean()
        (g,) = torch.autograd.grad(loss, P)
        P = P.detach()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        m_hat = m / (1 - 0.9**step)
        v_hat = v / (1 - 0.999**step)
        P = P - lr * m_hat / (v_hat.sqrt() + 1e-8)
    return P


def naive_conformity(out: Tensor, prototypes: Tensor, scale: float, p: float) -> Tensor:
    modified = -scale * naive_distances(out.double(), prototypes, p)
    return torch.softmax(modified, dim=1)


@pytest.fixture
def data() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(5)
    calib = torch.rand(21, 1, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (21,), generator=generator)
    test = torch.rand(6, 1, 4, 4, generator=generator)
    return calib, labels, test


@pytest.mark.parametrize(
    ("dtype", "scale", "p", "lr", "n_steps"),
    [
        (torch.float64, 10.0, 2.0, 0.1, 15),
        (torch.float64, 1.0, 1.0, 0.05, 10),
        (torch.float64, 3.0, math.inf, 0.2, 10),
        (torch.float64, 10.0, 2.0, 0.1, 0),
        (torch.float32, 10.0, 2.0, 0.1, 15),
        (torch.float32, 3.0, 3.0, 0.2, 10),
        # (L1 distances in float32 are left out: Adam's first steps normalise near-zero
        # gradient entries, so float32 rounding noise there changes the trajectory.)
    ],
)
def test_isomax_matches_naive(
    data: tuple[Tensor, Tensor, Tensor],
    dtype: torch.dtype,
    scale: float,
    p: float,
    lr: float,
    n_steps: int,
) -> None:
    calib, labels, test = (data[0].to(dtype), data[1], data[2].to(dtype))
    net = make_net(dtype=dtype, seed=2)
    rnet = Recorder(net, input_data=calib[[0]])
    params = {"entropic_scale": scale, "dist_norm": p, "lr": lr, "n_steps": n_steps}
    score = IsoMax(**params).fit(rnet, calib, labels)
    with torch.no_grad():
        calib_logits = net(calib)
        test_logits = net(test)
    prototypes = naive_fit(calib_logits, labels, scale, p, lr, n_steps)
    tol = {torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    assert score.prototypes.dtype == dtype
    torch.testing.assert_close(score.prototypes.double(), prototypes, atol=tol, rtol=tol)
    out, conformity = score(test)
    assert torch.equal(out, test_logits)
    assert conformity.shape == (6, 3)
    assert conformity.dtype == dtype
    expected = naive_conformity(test_logits, prototypes, scale, p)
    torch.testing.assert_close(conformity.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_absent_class_and_dtypes(data: tuple[Tensor, Tensor, Tensor], dtype: torch.dtype) -> None:
    calib, labels, test = (data[0].to(dtype), data[1].clamp(max=1), data[2].to(dtype))
    rnet = Recorder(make_net(dtype=dtype), input_data=calib[[0]])
    score = IsoMax(n_steps=50).fit(rnet, calib, labels)  # class 2 is absent
    out, conformity = score(test)
    assert conformity.dtype == out.dtype == dtype
    assert conformity.isfinite().all()
    assert score.prototypes.isfinite().all()
    torch.testing.assert_close(
        conformity.sum(dim=1).double(), torch.ones(6, dtype=torch.float64), atol=1e-2, rtol=0
    )


def test_untrained_prototypes_give_uniform(data: tuple[Tensor, Tensor, Tensor]) -> None:
    calib, labels, test = data
    rnet = Recorder(make_net(), input_data=calib[[0]])
    score = IsoMax(n_steps=0).fit(rnet, calib, labels)
    assert torch.equal(score.prototypes, torch.zeros(3, 3))
    torch.testing.assert_close(score(test)[1], torch.full((6, 3), 1 / 3))


def test_dataloader_fit_equals_tensor_fit_and_deterministic(
    data: tuple[Tensor, Tensor, Tensor],
) -> None:
    calib, labels, test = data
    rnet = Recorder(make_net(), input_data=calib[[0]])
    ref = IsoMax(n_steps=30).fit(rnet, calib, labels)
    again = IsoMax(n_steps=30).fit(rnet, calib, labels)
    assert torch.equal(ref.prototypes, again.prototypes)
    loader = DataLoader(TensorDataset(calib, labels), batch_size=7)
    streamed = IsoMax(n_steps=30).fit(rnet, loader)
    torch.testing.assert_close(streamed.prototypes, ref.prototypes)
    torch.testing.assert_close(streamed(test)[1], ref(test)[1])


def test_bad_labels(data: tuple[Tensor, Tensor, Tensor]) -> None:
    calib, labels, _ = data
    rnet = Recorder(make_net(), input_data=calib[[0]])
    for bad in (labels[:-1], labels.double(), labels + 1, labels - 1, labels[None]):
        with pytest.raises(ValueError, match="calib_labels"):
            IsoMax(n_steps=1).fit(rnet, calib, bad)
    assert not IsoMax(n_steps=1).is_fit


def test_inputs_untouched_and_checks(data: tuple[Tensor, Tensor, Tensor]) -> None:
    calib, labels, test = data
    saved_calib, saved_test = calib.clone(), test.clone()
    net = make_net()
    rnet = Recorder(net, input_data=calib[[0]])
    score = IsoMax(n_steps=5).fit(rnet, calib, labels)
    out, conformity = score(test)
    assert torch.equal(calib, saved_calib)
    assert torch.equal(test, saved_test)
    assert not calib.requires_grad
    assert not test.requires_grad
    assert not out.requires_grad
    assert not conformity.requires_grad
    assert not score.prototypes.requires_grad
    assert all(param.grad is None for param in net.parameters())
    for bad in ({"lr": 0.0}, {"lr": -1.0}, {"n_steps": -1}):
        with pytest.raises(AssertionError):
            IsoMax(**bad).fit(rnet, calib, labels)
    assert repr(IsoMax()) == (
        "IsoMax[unfit](act_norm=None, mode='raw', entropic_scale=10.0, dist_norm=2.0, "
        "lr=0.1, n_steps=1000)"
    )


def test_fit_jointly_equals_fit(data: tuple[Tensor, Tensor, Tensor]) -> None:
    calib, labels, test = data
    net = make_net()
    joint = IsoMax(n_steps=20)
    fit_jointly([(joint, [(1, 3)])], net, calib, labels, batch_size=7)
    ref = IsoMax(n_steps=20).fit(Recorder(net, input_data=calib[[0]]), calib, labels)
    torch.testing.assert_close(joint.prototypes, ref.prototypes)
    torch.testing.assert_close(joint(test)[1], ref(test)[1])
