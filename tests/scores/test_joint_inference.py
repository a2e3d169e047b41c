"""Joint inference: many scores, one recorded forward per batch, same results as alone."""

from __future__ import annotations

import pytest
import torch
from tests.catalogue import CATALOGUE
from tests.conftest import make_net
from torch import nn

from scio.recorder import Recorder
from scio.scores import JointInference, Softmax, infer_jointly

DTYPES = (torch.float16, torch.float32, torch.float64)


class _CountingNet(nn.Module):
    """Wraps a network and counts its forward calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def _fitted(net: nn.Module, calib: torch.Tensor, labels: torch.Tensor) -> list:
    fitted = []
    for entry in CATALOGUE:
        rnet = Recorder(net, input_data=calib[:1])
        rnet.record(*entry.layers)
        score = entry.make()
        fitted.append(score.fit(rnet, calib, labels if entry.uses_labels else None))
    return fitted


def _data(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    net = make_net(dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(40, 1, 4, 4, generator=generator).to(dtype)
    test = torch.randn(13, 1, 4, 4, generator=generator).to(dtype)
    with torch.no_grad():
        labels = net(calib).argmax(1)
    return net, calib, test, labels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_joint_equals_alone_for_every_algorithm(dtype: torch.dtype) -> None:
    net, calib, test, labels = _data(dtype)
    scores = _fitted(net, calib, labels)
    alone = [score(test) for score in scores]
    scores = _fitted(net, calib, labels)  # fresh fits: randomised scores restart their draws
    joint = infer_jointly(scores, test)
    for entry, (out_a, conf_a), (out_j, conf_j) in zip(CATALOGUE, alone, joint):
        assert torch.equal(out_a, out_j), entry.name
        # every deterministic algorithm runs the same code on the same tensors: bitwise
        torch.testing.assert_close(conf_j, conf_a, rtol=0, atol=0, equal_nan=True, msg=entry.name)


def test_one_forward_for_single_pass_scores() -> None:
    net, calib, test, labels = _data(torch.float32)
    counting = _CountingNet(net).eval()
    single_pass = [e for e in CATALOGUE if e.name in {"Softmax", "Energy", "KNN", "LID", "Trust"}]
    scores = []
    for entry in single_pass:
        rnet = Recorder(counting, input_data=calib[:1])
        rnet.record(*[(d + 1, i) for d, i in entry.layers])  # one level deeper: wrapped
        scores.append(entry.make().fit(rnet, calib, labels if entry.uses_labels else None))
    joint = JointInference(scores)
    joint(test)  # builds the union recorder (its summary runs one forward)
    counting.calls = 0
    joint(test)
    assert counting.calls == 1
    counting.calls = 0
    for score in scores:
        score(test)
    assert counting.calls == len(scores)


def test_batched_run_concatenates_and_times_once_per_call() -> None:
    net, calib, test, labels = _data(torch.float64)
    scores = _fitted(net, calib, labels)[:6]
    for score in scores:
        score.reset_timer()
    whole = infer_jointly(scores, test)
    batched = infer_jointly(scores, test, batch_size=4)
    for (out_w, conf_w), (out_b, conf_b) in zip(whole, batched):
        torch.testing.assert_close(out_b, out_w)
        torch.testing.assert_close(conf_b, conf_w, equal_nan=True)
    for score in scores:
        inference = [stat for stat in score.timer._stats if stat.op == "inference"]
        assert [stat.n_samples for stat in inference] == [len(test), len(test)]


def test_scores_on_different_networks_are_named() -> None:
    net, calib, _, _ = _data(torch.float32)
    other = make_net(seed=1)
    first = Softmax().fit(Recorder(net, input_data=calib[:1]), calib)
    second = Softmax().fit(Recorder(other, input_data=calib[:1]), calib)
    with pytest.raises(ValueError, match=r"scores\[0\] \(Softmax\) and scores\[1\] \(Softmax\)"):
        JointInference([first, second])


def test_unfitted_and_empty() -> None:
    net, calib, _, _ = _data(torch.float32)
    with pytest.raises(ValueError, match="at least one"):
        JointInference([])
    rnet = Recorder(net, input_data=calib[:1])
    with pytest.raises(RuntimeError, match=r"scores\[0\]` \(Softmax\) is not fitted: fit it"):
        JointInference([Softmax()])
    score = Softmax().fit(rnet, calib)
    with pytest.raises(ValueError, match="batch_size"):
        infer_jointly([score], calib, batch_size=0)
