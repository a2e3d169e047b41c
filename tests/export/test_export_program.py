"""``torch.export`` of exported scores: a free batch dimension, equal to the eager module;
scores that cannot be one graph and networks ``torch.export`` cannot trace are refused with
the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scio.export import ExportError, as_module, compare, export_program
from scio.recorder import Recorder
from scio.scores import KNN, ODIN, DeepMahalanobis, GradNorm
from tests.catalogue import BY_NAME, CATALOGUE, Entry
from tests.export.helpers import EAGER_ONLY, REPRESENTATIVE, data, fit

EXAMPLE = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))


def _check_program(entry: Entry) -> None:
    module = as_module(fit(entry))
    if entry.name in EAGER_ONLY:
        with pytest.raises(ExportError, match=EAGER_ONLY[entry.name]):
            export_program(module, EXAMPLE)
        return
    program = export_program(module, EXAMPLE).module()
    generator = torch.Generator().manual_seed(5)
    for n in (1, 37):  # neither the example's size nor one seen before
        x = torch.randn(n, 1, 4, 4, generator=generator)
        x[n // 2, 0, 0, 0] = float("nan")  # NaN conformity for that sample alone
        expected = module(x)
        with torch.no_grad():
            got = program(x)
        assert got[1].shape == expected[1].shape
        difference = compare(got, expected, atol=1e-4, rtol=1e-4)
        assert difference.ok, f"{entry.name}, batch {n}: {difference}"
        assert bool(got[1][n // 2].isnan().all())


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_scores_export_with_a_dynamic_batch(name: str) -> None:
    _check_program(BY_NAME[name])


@pytest.mark.slow
@pytest.mark.parametrize(
    "entry", [e for e in CATALOGUE if e.name not in REPRESENTATIVE], ids=lambda e: e.name
)
def test_every_catalogue_score_exports_or_says_why(entry: Entry) -> None:
    _check_program(entry)


@pytest.mark.parametrize(
    ("score", "layers"),
    [(ODIN(temperature=2.0, epsilon=0.01), ()), (DeepMahalanobis(epsilon=0.01), ((1, 4),))],
    ids=["ODIN", "DeepMahalanobis"],
)
def test_input_gradient_scores_say_so(score: object, layers: tuple[tuple[int, int], ...]) -> None:
    net, calib, labels, _ = data()
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record(*layers)
    module = as_module(score.fit(rnet, calib, labels))  # type: ignore[attr-defined]
    with pytest.raises(ExportError, match="needs input gradients"):
        export_program(module, EXAMPLE)
    # torch.export itself reaches the module's own refusal (is_exporting in forward)
    with pytest.raises(ExportError, match="needs input gradients"):
        torch.export.export(module, (EXAMPLE,))


def test_per_sample_gradient_scores_say_so() -> None:
    net, calib, _, _ = data()
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 1))  # a conv's parameters: GradNorm's per-sample gradient path
    module = as_module(GradNorm().fit(rnet, calib))
    with pytest.raises(ExportError, match="runs the network again"):
        export_program(module, EXAMPLE)


def _numpy_round_trip(y: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(y.detach().cpu().numpy())


torch.fx.wrap("_numpy_round_trip")  # a single call node for torch.fx


class _NumpyNet(nn.Module):
    """Traceable by torch.fx, not by torch.export (a numpy round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y + _numpy_round_trip(y) * 0


def test_network_torch_export_cannot_trace_is_refused() -> None:
    net = _NumpyNet().eval()
    calib = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record("fc")
    score = KNN(k=2).fit(rnet, calib)
    module = as_module(score)
    x = torch.randn(5, 4)
    torch.testing.assert_close(module(x)[1], score(x)[1], atol=1e-6, rtol=0)  # eager works
    with pytest.raises(ExportError, match="torch.export cannot trace KNN"):
        export_program(module, x)


class _DynamicNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y if bool(y.sum() > 0) else -y


def test_network_torch_fx_cannot_trace_is_refused() -> None:
    net = _DynamicNet().eval()
    calib = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    rnet = Recorder(net, input_data=calib[:1], force_static_flow=False)
    rnet.record("fc")
    score = KNN(k=2).fit(rnet, calib)
    with pytest.raises(ExportError, match="torch.fx cannot trace the network"):
        as_module(score)
