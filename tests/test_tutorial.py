"""The "Inferring with Confidence" tutorial, end to end on the embedded model."""

from __future__ import annotations

import ast
import io
import re
import runpy
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from scio.demo import parse_layer, run_demo
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "inferring_with_confidence.py"


def _run_like_a_notebook(path: Path) -> tuple[dict[str, Any], str]:
    """Execute a script statement by statement, displaying bare expressions."""
    tree = ast.parse(path.read_text())
    namespace: dict[str, Any] = {"__name__": "__main__"}
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        for node in tree.body:
            if isinstance(node, ast.Expr):
                value = eval(compile(ast.Expression(node.value), str(path), "eval"), namespace)
                if value is not None:
                    print(repr(value))
            else:
                exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace, buffer.getvalue()


def _brute_force_knn(rnet: Any, calib: torch.Tensor, test: torch.Tensor, k: int) -> torch.Tensor:
    with torch.no_grad():
        rnet(calib)
        (ref,) = rnet.activations.values()
        rnet(test)
        (query,) = rnet.activations.values()
    ref = ref.flatten(1).double()
    query = query.flatten(1).double()
    ref = ref / ref.norm(dim=1, keepdim=True)
    query = query / query.norm(dim=1, keepdim=True)
    values = []
    for q in query:
        dists = sorted(float(((q - r) ** 2).sum()) for r in ref)
        values.append(-dists[k - 1])
    return torch.tensor(values, dtype=torch.float64)


def test_tutorial_script_runs_unchanged() -> None:
    namespace, output = _run_like_a_notebook(EXAMPLE)
    out, conformity = namespace["out"], namespace["conformity"]
    assert out.shape == conformity.shape == (5, 10)
    assert torch.equal(conformity, conformity[:, :1].expand(5, 10))
    assert "Recorder instance for the following network" in output
    assert "├─AdaptiveAvgPool2d (avgpool): 1-11" in output
    assert "Currently recording: None" in output
    assert "KNN[fit](act_norm=2.0, mode='raw', k=2, index_metric='l2')" in output
    lines = re.findall(r"Sample (\d): predicted (\d) with confidence (-?[\d.e-]+)", output)
    assert [int(i) for i, _, _ in lines] == list(range(5))
    assert all(-4 <= float(c) <= 0 for _, _, c in lines)
    expected = _brute_force_knn(
        namespace["rnet"], namespace["calib_data"], namespace["test_data"], 2
    )
    torch.testing.assert_close(conformity[:, 0].double(), expected, atol=1e-6, rtol=0)
    flat = " ".join(output.split())
    assert "ScoreTimer report for KNN(act_norm=2.0, index_metric='l2', k=2, mode='raw')" in flat
    assert "┃ Operation ┃ # samples ┃ Duration ┃" in flat
    assert flat.index("│ inference │ 5 │") < flat.index("│ calibration │ 10 │")
    assert "Entries are listed from newest to oldest" in flat


def test_tutorial_layer_table_matches_reference() -> None:
    namespace, _ = _run_like_a_notebook(EXAMPLE)
    reference = REPO_ROOT.parent / "shared" / "spec" / "tutorial-inferring-with-confidence.txt"
    if not reference.exists():
        pytest.skip("reference tutorial text not found beside the repository")
    ref_rows = [
        " ".join(line.split())
        for line in reference.read_text().splitlines()
        if re.search(r"[├│└]", line)
        or line.startswith(("Total params", "Trainable", "Non-trainable", "Total mult"))
    ]
    ref_rows = [
        row
        for row in ref_rows
        if "┃" not in row
        and "─┼" not in row
        and "│ inference" not in row
        and "│ calibration" not in row
    ]
    ours = [" ".join(line.split()) for line in repr(namespace["rnet"]).splitlines()]
    for row in ref_rows:
        assert row in ours, row


def test_script_runs_as_plain_python() -> None:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert buffer.getvalue().count("Sample ") == 5


def test_demo_function_output() -> None:
    console = Console(file=io.StringIO(), width=160)
    out, conformity = run_demo(n_calib=12, n_test=3, k=3, layer="avgpool", seed=1, console=console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert out.shape == conformity.shape == (3, 10)
    assert "Recording layer (1, 11) ('avgpool')" in text
    assert "KNN[fit](act_norm=2.0, mode='raw', k=3, index_metric='l2')" in text
    assert len(re.findall(r"Sample \d: predicted [a-z]+ with confidence -?\d", text)) == 3
    assert "Entries are listed from newest to" in text
    again, _ = run_demo(
        n_calib=12, n_test=3, k=3, layer=(1, 11), seed=1, console=Console(file=io.StringIO())
    )
    torch.testing.assert_close(again, out)
    with pytest.raises(ValueError, match="must be positive"):
        run_demo(n_calib=0)


def test_parse_layer() -> None:
    assert parse_layer("1,11") == (1, 11)
    assert parse_layer("(1, 11)") == (1, 11)
    assert parse_layer("1-11") == (1, 11)
    assert parse_layer("avgpool") == "avgpool"


def test_cli_demo_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scio", "demo", "--n-calib", "8", "--n-test", "2", "--k", "2"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "Sample 1: predicted" in result.stdout
    assert "KNN[fit](act_norm=2.0, mode='raw', k=2, index_metric='l2')" in result.stdout
    assert "Currently recording: None" in result.stdout
