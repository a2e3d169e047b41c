"""``scio export SCORE_FILE --model ...``: a saved score and its model exported, checked
against the score on random batches, the largest difference printed; nothing written on
failure."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import scio
from scio.cli import main
from scio.export.cli import load_model
from scio.recorder import Recorder
from scio.scores import KNN, ODIN
from tests.conftest import make_net
from tests.export.helpers import data

MODEL = "tests.conftest:make_net"  # a seeded TinyConvNet: the same weights at every call


def _saved(score: object, path: Path, *layers: tuple[int, int]) -> Path:
    net, calib, labels, _ = data()
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record(*layers)
    score.fit(rnet, calib, labels)  # type: ignore[attr-defined]
    file = path / "score.pt"
    score.save(file)  # type: ignore[attr-defined]
    return file


def test_exports_a_program_and_prints_the_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = _saved(KNN(k=3), tmp_path, (1, 4))
    out = tmp_path / "out" / "knn.pt2"
    assert main(["export", str(file), "--model", MODEL, "--program", str(out), "--batch", "5"]) == 0
    printed = capsys.readouterr().out
    assert "KNN checked with the torch.export program against the score" in printed
    assert "random batches of 1 and 5" in printed
    assert "largest difference" in printed
    program = torch.export.load(out).module()
    score = scio.load_score(file, make_net())
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = program(x)
    torch.testing.assert_close(got[1], score(x)[1], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="ONNX export needs onnx, onnxscript and onnxruntime (pip install 'scio[export]')",
)
@pytest.mark.slow  # an ONNX export takes seconds; the fast loop exports a program
def test_exports_an_onnx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = _saved(KNN(k=3), tmp_path, (1, 4))
    out = tmp_path / "knn.onnx"
    assert main(["export", str(file), "--model", MODEL, "--onnx", str(out)]) == 0
    assert "checked with the ONNX Runtime against the score" in capsys.readouterr().out
    assert out.stat().st_size > 0


def test_a_score_that_cannot_be_exported_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = _saved(ODIN(temperature=2.0, epsilon=0.01), tmp_path)
    out = tmp_path / "odin.pt2"
    assert main(["export", str(file), "--model", MODEL, "--program", str(out)]) == 1
    assert "needs input gradients" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["score.pt"]


def test_a_check_beyond_tolerance_fails_loudly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = _saved(KNN(k=3), tmp_path, (1, 4))
    out = tmp_path / "knn.pt2"
    args = ["export", str(file), "--model", MODEL, "--program", str(out)]
    # the exported search is a matrix product: equal to the score up to rounding only
    assert main([*args, "--atol", "0", "--rtol", "0"]) == 1
    assert "disagrees with KNN beyond atol=0.0, rtol=0.0" in capsys.readouterr().err
    assert not out.exists()


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = _saved(KNN(k=3), tmp_path, (1, 4))
    assert main(["export", str(file), "--model", MODEL]) == 2
    assert "--onnx PATH and/or --program PATH" in capsys.readouterr().err
    assert main(["export", str(file), "--model", "nonsense", "--program", "x.pt2"]) == 1
    assert "'package.module:function'" in capsys.readouterr().err
    missing = str(tmp_path / "missing.pt")
    assert main(["export", missing, "--model", MODEL, "--program", "x.pt2"]) == 1
    assert "missing.pt" in capsys.readouterr().err


def test_load_model_names_the_embedded_models() -> None:
    net = load_model("tiniest")
    assert type(net).__name__ == "Tiniest"
    assert not net.training
    with pytest.raises(ValueError, match="cannot import 'nope'"):
        load_model("scio.models:nope")
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        load_model("builtins:object")
