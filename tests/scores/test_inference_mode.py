"""Every score gives the same result when the caller is under ``torch.inference_mode()`` or
``torch.no_grad()`` as outside: gradient scores re-enable what they need locally."""

from __future__ import annotations

import pytest
import torch
from tests.catalogue import CATALOGUE, Entry
from tests.conftest import make_net

from scio import scores
from scio.recorder import Recorder

#: the catalogue's gradient scores at settings where they do take input gradients
GRADIENT = (
    Entry("ODIN-eps", lambda: scores.ODIN(temperature=2.0, epsilon=0.01)),
    Entry("DeepMahalanobis-eps", lambda: scores.DeepMahalanobis(epsilon=0.01), ((1, 4),), True),
)


@pytest.mark.parametrize("entry", CATALOGUE + GRADIENT, ids=lambda e: e.name)
def test_same_result_under_inference_mode_and_no_grad(entry: Entry) -> None:
    net = make_net(dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(30, 1, 4, 4, generator=generator, dtype=torch.float64)
    test = torch.randn(6, 1, 4, 4, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        labels = net(calib).argmax(1)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record(*entry.layers)
    score = entry.make().fit(rnet, calib, labels if entry.uses_labels else None)
    out, expected = score(test)
    with torch.no_grad():
        got_no_grad = score(test)
    with torch.inference_mode():
        inference_test = test.clone()  # an inference tensor, as a service would pass
        got_inference = score(inference_test)
    for got in (got_no_grad, got_inference):
        torch.testing.assert_close(got[0], out, rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected, rtol=0, atol=0, equal_nan=True)
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())
