"""The CIFAR-10 tutorial model "Tiniest": exact rebuild, real-photo check, hub, fx."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import scio.models
from scio.models import CIFAR10_CLASSES, Tiniest, tiniest

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = REPO_ROOT.parent / "shared" / "models" / "tiniest_reference.pt"
LAYERS = ("conv1", "ln1", "l1", "l2", "l3", "dsconv", "ln2", "l4", "l5", "l6", "avgpool", "fc")


@pytest.fixture(scope="module")
def net() -> Tiniest:
    return tiniest()


@pytest.fixture(scope="module")
def reference() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"reference outputs not found at {REFERENCE} (shared/ beside the checkout)")
    return torch.load(REFERENCE, weights_only=True)


def _close(actual: Tensor, expected: Tensor) -> None:
    # 1e-5 relative to the tensor's scale (activations reach ~140 in float32).
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def test_structure(net: Tiniest) -> None:
    assert sum(p.numel() for p in net.parameters()) == 97_530
    assert [name for name, _ in net.named_children()] == list(LAYERS)
    assert not net.training
    children = dict(net.l1.named_children())
    assert list(children) == ["dwconv1", "dwconv2", "dwconv3", "ln", "fc1", "fc2"]
    assert net.l1.rs.shape == (1, 48, 1, 1)


def test_untrained() -> None:
    net = tiniest(pretrained=False)
    assert isinstance(net, Tiniest)
    assert torch.equal(net.l4.rs, torch.ones(1, 80, 1, 1))


def test_reproduces_reference(net: Tiniest, reference: dict) -> None:
    assert list(net.state_dict()) == reference["state_dict_keys"]
    assert sum(p.numel() for p in net.parameters()) == reference["n_params"]
    acts: dict[str, Tensor] = {}
    handles = [
        getattr(net, name).register_forward_hook(
            lambda _m, _i, out, name=name: acts.__setitem__(name, out)
        )
        for name in LAYERS
    ]
    try:
        with torch.no_grad():
            logits = net(reference["inputs"])
    finally:
        for h in handles:
            h.remove()
    _close(logits, reference["logits"])
    for name in LAYERS:
        out = acts[name]
        means = out.mean((2, 3)) if out.ndim == 4 else out
        _close(means, reference["channel_means"][name])
        _close(out[:2], reference["activations_first2"][name])


def test_chelsea_is_a_cat(net: Tiniest) -> None:
    data = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 255
    h, w = img.shape[1:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = img[None, :, top : top + s, left : left + s]
    x = F.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        probs = net(x).softmax(1)[0]
    assert CIFAR10_CLASSES[int(probs.argmax())] == "cat"
    assert probs.max().item() == pytest.approx(0.958, abs=5e-3)


def test_fx_traceable(net: Tiniest) -> None:
    gm = torch.fx.symbolic_trace(net)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x))


def test_hub_load(net: Tiniest) -> None:
    hub_net = torch.hub.load(str(REPO_ROOT), "tiniest", source="local")
    assert isinstance(hub_net, scio.models.Tiniest)
    assert not hub_net.training
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hub_net(x), net(x))
