"""ONNX export of exported scores, run with ONNX Runtime at batch 1 and 37 against the eager
module; nothing is written when the export or its check fails."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from scio.export import ExportError, as_module, compare, export_onnx, onnx_runner
from tests.catalogue import BY_NAME, CATALOGUE, Entry
from tests.export.helpers import EAGER_ONLY, NO_ONNX, fit

_MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"ONNX export needs {', '.join(_MISSING)} (pip install 'scio[export]')",
)
EXAMPLE = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
#: Exported in the fast test loop (each ONNX export takes seconds).
FAST = ("Softmax", "KNN")


def _check_onnx(entry: Entry, tmp_path: Path) -> None:
    module = as_module(fit(entry))
    path = tmp_path / f"{entry.name}.onnx"
    if entry.name in EAGER_ONLY or entry.name in NO_ONNX:
        reason = EAGER_ONLY.get(entry.name) or NO_ONNX[entry.name]
        with pytest.raises(ExportError, match=reason):
            export_onnx(module, EXAMPLE, path)
        assert list(tmp_path.iterdir()) == []
        return
    checked = export_onnx(module, EXAMPLE, path)
    assert sorted(checked) == [1, 37]
    assert all(d.ok for d in checked.values())
    run = onnx_runner(path)
    generator = torch.Generator().manual_seed(11)
    for n in (1, 37):
        x = torch.randn(n, 1, 4, 4, generator=generator)
        x[n // 2, 0, 0, 0] = float("inf")  # NaN conformity for that sample alone
        got = run(x)
        difference = compare(got, module(x), atol=1e-4, rtol=1e-4)
        assert difference.ok, f"{entry.name}, batch {n}: {difference}"
        assert bool(got[1][n // 2].isnan().all())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


@needs_onnx
@pytest.mark.parametrize("name", FAST)
def test_representative_scores_run_in_onnx_runtime(name: str, tmp_path: Path) -> None:
    _check_onnx(BY_NAME[name], tmp_path)


@needs_onnx
@pytest.mark.slow
@pytest.mark.parametrize(
    "entry", [e for e in CATALOGUE if e.name not in FAST], ids=lambda e: e.name
)
def test_every_catalogue_score_runs_in_onnx_runtime_or_says_why(
    entry: Entry, tmp_path: Path
) -> None:
    _check_onnx(entry, tmp_path)


@needs_onnx
@pytest.mark.slow
def test_a_check_beyond_tolerance_writes_nothing(tmp_path: Path) -> None:
    module = as_module(fit(BY_NAME["Energy"]))
    path = tmp_path / "energy.onnx"
    # ONNX Runtime's float32 activations differ from torch's in the last bits
    with pytest.raises(ExportError, match="ONNX Runtime disagrees with Energy.*nothing written"):
        export_onnx(module, EXAMPLE, path, atol=0.0, rtol=0.0)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_packages_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name)
    )
    with pytest.raises(ImportError, match=r"onnxscript.*scio\[export\]"):
        export_onnx(as_module(fit(BY_NAME["Softmax"])), EXAMPLE, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


class _SvdNet(torch.nn.Module):
    """A network with an operator ONNX has no form of (singular values)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y + torch.linalg.svdvals(y.reshape(y.shape[0], 2, 2)).sum(1, keepdim=True)


@needs_onnx
def test_an_operator_onnx_lacks_is_named_and_nothing_written(tmp_path: Path) -> None:
    from scio.recorder import Recorder
    from scio.scores import Energy

    net = _SvdNet().eval()
    calib = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    module = as_module(Energy().fit(Recorder(net, input_data=calib[:1]), calib))
    with pytest.raises(ExportError, match="no translation of the operator aten._linalg_svd"):
        export_onnx(module, calib[:4], tmp_path / "svd.onnx")
    assert list(tmp_path.iterdir()) == []
