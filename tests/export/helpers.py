"""Fitted catalogue scores on the tiny test network, shared by the export tests."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn

from scio.recorder import Recorder
from scio.scores import BaseScore
from tests.catalogue import Entry
from tests.conftest import make_net

#: Catalogue entries that cannot be one exported graph, and the reason their error gives.
EAGER_ONLY = {
    "FeatureSqueezing": "runs the network again",
    "Odds": "runs the network again",
    "AdaScale": "input gradients",
    "IODIN": "input gradients",
}
#: Exportable entries that ONNX cannot hold, and the operator the error names (none today:
#: RankFeat's rank-1 part is batched matrix products, no SVD).
NO_ONNX: dict[str, str] = {}
#: The five scores of the issue's latency table, exported in the fast test loop.
REPRESENTATIVE = ("Softmax", "KNN", "DeepMahalanobis", "ViM", "ReAct")


@functools.cache
def _data() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    net = make_net()
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(40, 1, 4, 4, generator=generator)
    with torch.no_grad():
        labels = net(calib).argmax(1)
    x = torch.randn(7, 1, 4, 4, generator=generator)
    return net, calib, labels, x


def data() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(net, calib, labels, x)``: a fresh TinyConvNet (float32), 40 calibration inputs,
    their predicted labels, and 7 test inputs."""
    _, calib, labels, x = _data()
    return make_net(), calib, labels, x


def fit(entry: Entry, net: nn.Module | None = None, **params: Any) -> BaseScore:
    """The catalogue entry fitted on the test data (``net``: a fresh TinyConvNet)."""
    fresh, calib, labels, _ = data()
    net = fresh if net is None else net
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record(*entry.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. singular covariances on 40 samples
        return entry.make(**params).fit(rnet, calib, labels if entry.uses_labels else None)


def hook_counts(net: nn.Module) -> list[int]:
    """Forward (pre-)hooks of every module of ``net``."""
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()]
