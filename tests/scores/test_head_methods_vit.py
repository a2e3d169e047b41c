"""Head-based scores on a transformer classifier that torch.fx cannot trace.

A small randomly initialised ViT-style network (patch embedding, cls token, one pre-norm
encoder block, final LayerNorm, ``self.head = nn.Linear`` applied to ``x[:, 0]``) with a
data-dependent ``if``: the head is found by hook-based discovery, not from an fx graph.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from scio import scores
from scio.recorder import Recorder
from scio.scores.classification.fdbd import fdbd_conformity, fdbd_inverse_gaps
from scio.scores.core.calibration import CalibBatch

DIM, N_CLASSES = 16, 5


class Block(nn.Module):
    """Pre-norm encoder block: multi-head self-attention then an MLP, both residual."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.n_heads, -1).unbind(2)
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-2, -1) / (d // self.n_heads) ** 0.5, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """8x8 images, 4x4 patches (4 tokens + cls), width 16, 5 classes."""

    def __init__(self, *, scale_output: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, kernel_size=4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 5, DIM))
        self.block = Block(DIM, 2)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, N_CLASSES)
        self.scale_output = scale_output

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        if tokens.abs().amax() > 1e3:  # data-dependent control flow: not fx-traceable
            tokens = tokens / tokens.abs().amax()
        out = self.head(self.norm(self.block(tokens))[:, 0])
        return 2 * out if self.scale_output else out


def _vit(seed: int = 0, **kwargs: bool) -> TinyViT:
    torch.manual_seed(seed)
    return TinyViT(**kwargs).eval()


def _head_scores() -> list[scores.BaseScore]:
    made: list[scores.BaseScore] = [
        scores.ViM(dim=8),
        scores.NNGuide(k=5),
        scores.fDBD(),
        scores.NCI(alpha=0.01),
        scores.SHE(),
    ]
    for name in ("ASH", "SCALE", "DICE"):  # written by another helper, when present
        if hasattr(scores, name):
            made.append(getattr(scores, name)())
    return made


def _data() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(40, 3, 8, 8, generator=generator)
    labels = torch.randint(0, N_CLASSES, (40,), generator=generator)
    test = torch.randn(6, 3, 8, 8, generator=generator)
    return calib, labels, test


def test_vit_is_not_fx_traceable() -> None:
    net = _vit()
    with pytest.raises(RuntimeError, match="control flow of the input network is not static"):
        Recorder(net, input_size=(1, 3, 8, 8))


@pytest.mark.parametrize("score", _head_scores(), ids=lambda s: type(s).__name__)
def test_head_methods_fit_and_infer_on_a_vit(score: scores.BaseScore) -> None:
    net = _vit()
    calib, labels, test = _data()
    rnet = Recorder(net, input_size=(1, 3, 8, 8), force_static_flow=False)
    rnet.record("norm")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SHE: classes without a pattern
        score.fit(rnet, calib, labels)
    assert score.head_name == "head"  # type: ignore[attr-defined]
    out, conformity = score(test)
    with torch.no_grad():
        expected = net(test)
        feats = net.norm(net.block(_tokens(net, test)))[:, 0]
    torch.testing.assert_close(out, expected)
    assert conformity.shape == (6, N_CLASSES)
    assert not conformity.isnan().any()
    # The features the score reads are the head's input x[:, 0], captured by the forward.
    _, tapped = score.head_forward(test)  # type: ignore[attr-defined]
    torch.testing.assert_close(tapped, feats)
    # The explicit override names the same head and gives the same conformity.
    named = type(score)(**{**score.params, "head": "head"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        named.fit(rnet, calib, labels)
    torch.testing.assert_close(named(test)[1], conformity)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key  # the model is never modified


def _tokens(net: TinyViT, x: Tensor) -> Tensor:
    tokens = net.patch(x).flatten(2).transpose(1, 2)
    return torch.cat([net.cls.expand(len(x), -1, -1), tokens], dim=1) + net.pos


def test_vit_features_give_the_papers_formulas() -> None:
    """fDBD and NCI on the ViT equal the pure formulas on the hand-extracted cls features."""
    net = _vit(seed=1)
    calib, _, test = _data()
    rnet = Recorder(net, input_size=(1, 3, 8, 8), force_static_flow=False)
    rnet.record("norm")
    with torch.no_grad():
        calib_feats = net.norm(net.block(_tokens(net, calib)))[:, 0]
        test_feats = net.norm(net.block(_tokens(net, test)))[:, 0]
        logits = net.head(test_feats)
    center = calib_feats.double().mean(dim=0)
    weight = net.head.weight.detach()
    fdbd = scores.fDBD().fit(rnet, calib)
    expected = fdbd_conformity(logits, test_feats, fdbd_inverse_gaps(weight), center)
    torch.testing.assert_close(fdbd(test)[1][:, 0], expected.float())


def test_no_linear_head_after_the_recorded_layer() -> None:
    calib, labels, _ = _data()
    # Recording the head itself: nothing follows it.
    rnet = Recorder(_vit(), input_size=(1, 3, 8, 8), force_static_flow=False)
    rnet.record("head")
    with pytest.raises(ValueError, match=r"No linear head follows the recorded layer .*'head'"):
        scores.ViM().fit(rnet, calib)
    # The network output is not a linear layer's output (scaled after the head).
    rnet = Recorder(_vit(scale_output=True), input_size=(1, 3, 8, 8), force_static_flow=False)
    rnet.record("norm")
    for score in _head_scores():
        with pytest.raises(ValueError, match=r"No linear head follows the recorded layer .*'norm'"):
            score.fit(rnet, calib, labels)
    # ... unless the head is named explicitly.
    score = scores.NCI(head="head").fit(rnet, calib)
    assert score.head_name == "head"
    # Scores then read the named head's own logits: fDBD does not see the output scaling.
    plain = Recorder(_vit(), input_size=(1, 3, 8, 8), force_static_flow=False)
    plain.record("norm")
    _, expected = scores.fDBD().fit(plain, calib)(calib[:6])
    out, conformity = scores.fDBD(head="head").fit(rnet, calib)(calib[:6])
    torch.testing.assert_close(conformity, expected)
    with torch.no_grad():
        torch.testing.assert_close(out, 2 * plain.net(calib[:6]))
    with pytest.raises(ValueError, match=r"`head`='norm' must name an nn.Linear"):
        scores.NCI(head="norm").fit(rnet, calib)
    with pytest.raises(ValueError, match=r"`head`='nope' is not a module of the network"):
        scores.NCI(head="nope").fit(rnet, calib)


@pytest.mark.parametrize(
    ("score", "kept"),
    [
        (scores.ViM(dim=8), {"residual_rows", "residual_weight"}),
        (scores.fDBD(), set()),
        (scores.NCI(), set()),
        (scores.SHE(), set()),
        (scores.NNGuide(k=3), {"bank"}),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, scores.BaseScore) else str(sorted(v)),
)
def test_calibration_keeps_running_sums_only(score: scores.BaseScore, kept: set[str]) -> None:
    """NNGuide keeps its bank, ViM a bounded subsample of features (for the exact mean
    residual norm); the others keep O(d²) sums only."""
    net = _vit()
    calib, labels, _ = _data()
    rnet = Recorder(net, input_size=(1, 3, 8, 8), force_static_flow=False)
    rnet.record("norm")
    score._rnet = rnet  # drive the batch protocol by hand to inspect the state
    score._calib_start()
    score._calib_prepare(rnet, calib)  # type: ignore[attr-defined]
    for start in range(0, 40, 16):
        batch = CalibBatch(calib[start : start + 16], labels[start : start + 16], rnet)
        score._calib_update(batch)
    state = score._state  # type: ignore[attr-defined]
    assert set(state._parts) == kept
    assert all(v.numel() <= DIM * DIM for v in state._sums.values())
    if isinstance(score, scores.ViM):
        assert sum(v.numel() for v in state._parts["residual_rows"]) <= score.residual_budget
