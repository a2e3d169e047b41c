"""The Hugging Face worked example of docs/models.md runs offline on tiny models."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "transformers", reason="transformers is an optional extra: pip install scio[hf]"
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hugging_face.py"


def test_hugging_face_example_runs_offline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["text", "logits"],
        ["text", "Energy"],
        ["image", "KNN"],
        ["image", "ODIN"],
    ]
    assert lines[0].startswith("text  logits (8, 2) KNN [")
    assert "nan" not in " ".join(lines)
