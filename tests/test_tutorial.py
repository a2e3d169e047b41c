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

import numpy as np
import pytest
import torch
from rich.console import Console

from scio.demo import parse_layer, run_demo
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "inferring_with_confidence.py"
DIVING = REPO_ROOT / "examples" / "diving_inside_neural_networks.py"
EVALUATING = REPO_ROOT / "examples" / "visualizing_and_evaluating.py"
CUSTOM_SCORE = REPO_ROOT / "examples" / "implementing_your_own_ood_detection_algorithm.py"
CUSTOM_METRIC = REPO_ROOT / "examples" / "implementing_your_own_discriminative_power_metric.py"
#: What the reference library prints for the same statements (seed 0, 150 columns), made by
#: running each example against it with only the model loading swapped (docs/compatibility.md).
REFERENCE_OUTPUTS = Path(__file__).parent / "data" / "tutorials"


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


_ELAPSED = re.compile(r"\b\d+:\d\d:\d\d\b")  # progress bars' elapsed time
_DURATION = re.compile(r"\b\d+(?:\.\d*)? ?(?:s|ms|μs|ns|ps|fs|as)\b")  # timer values
_ADDRESS = re.compile(r"\bat 0x[0-9a-f]+\b")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _skeletons(text: str) -> list[tuple[str, list[float]]]:
    """Each non-blank line without timer values, elapsed times and addresses, its runs of
    spaces and rules collapsed (column widths follow the durations), and its numbers apart."""
    lines = []
    for line in text.splitlines():
        line = _ADDRESS.sub("at 0x?", _DURATION.sub("<t>", _ELAPSED.sub("<t>", line)))
        line = re.sub(r"━+", "━", re.sub(r"─+", "─", re.sub(r"\s+", " ", line))).strip()
        if line:
            numbers = [float(n) for n in _NUMBER.findall(line)]
            lines.append((_NUMBER.sub("#", line), numbers))
    return lines


def _assert_same_lines(ours: str, reference: str) -> None:
    """Same lines as the reference, timer values aside; numbers within float32 rounding."""
    got, expected = _skeletons(ours), _skeletons(reference)
    assert [text for text, _ in got] == [text for text, _ in expected]
    for (text, numbers), (_, ref_numbers) in zip(got, expected):
        np.testing.assert_allclose(numbers, ref_numbers, rtol=1e-5, atol=1e-6, err_msg=text)


def _run_tutorial(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    """Run a tutorial as the reference outputs were made: seed 0, a 150-column rich console,
    figures shown by ``plt.show`` closed (their number is kept in ``namespace["_shown"]``)."""
    import matplotlib.pyplot as plt
    import rich

    shown: list[int] = []

    def show(*, block: bool | None = None) -> None:
        shown.append(len(plt.gcf().axes))
        plt.close("all")

    monkeypatch.setattr(plt, "show", show)
    monkeypatch.setattr(rich, "_console", Console(width=150, color_system=None))
    torch.manual_seed(0)
    namespace, output = _run_like_a_notebook(path)
    namespace["_shown"] = shown
    return namespace, output


@pytest.mark.slow
def test_tutorial_prints_the_reference_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    _, output = _run_tutorial(EXAMPLE, monkeypatch)
    reference = (REFERENCE_OUTPUTS / "inferring_with_confidence.out").read_text()
    _assert_same_lines(output, reference)


@pytest.mark.slow
def test_diving_inside_neural_networks_tutorial(monkeypatch: pytest.MonkeyPatch) -> None:
    namespace, output = _run_tutorial(DIVING, monkeypatch)
    lines = output.splitlines()
    assert "Currently recording: None" in lines
    assert "Currently recording: 1-3, 1-11" in lines
    activations = namespace["rnet"].activations
    assert list(activations) == [(1, 3), (1, 11)]
    assert activations[(1, 3)].shape == (5, 48, 32, 32)
    assert activations[(1, 11)].shape == (5, 80, 1, 1)
    reference = (REFERENCE_OUTPUTS / "diving_inside_neural_networks.out").read_text()
    _assert_same_lines(output, reference)


@pytest.mark.slow
@pytest.mark.skipif(
    not (REFERENCE_OUTPUTS / "visualizing_and_evaluating.out").exists(),
    reason="the reference's printed output of this tutorial is not recorded yet",
)
def test_visualizing_and_evaluating_tutorial(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("skimage", reason="the tutorial's offline data are scikit-image photos")
    namespace, output = _run_tutorial(EVALUATING, monkeypatch)
    assert namespace["_shown"] == [4 + 3]  # summary_plot: 4 histograms, 3 ROC panels
    assert namespace["confs_ind"].shape == (4, 1000)
    assert [c.shape for c in namespace["confs_oods"]] == [(4, 1000)] * 3
    assert output.count("----") == 4
    flat = " ".join(output.split())
    assert re.search(r"\d:\d\d:\d\d Fitting Scores\.\.\. \(1000 samples\) ━+ 4/4 Done", flat)
    assert re.search(r"\d:\d\d:\d\d Computing confidences\.\.\. ━+ 4/4 Done", flat)
    assert "Evaluation of 4 scores against 3 OoD sets and 2 metrics:" in flat
    assert "AUC(max_fpr=0.2) / TPR(max_fpr=0.05)" in flat
    reference = (REFERENCE_OUTPUTS / "visualizing_and_evaluating.out").read_text()
    _assert_same_lines(output, reference)


@pytest.mark.slow
def test_custom_score_and_metric_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    namespace, output = _run_tutorial(CUSTOM_SCORE, monkeypatch)
    assert "ClassMeanCosine[fit](act_norm=None, mode='raw', eps=1e-12)" in output
    assert "torch.Size([4, 10])" in output
    assert "torch.Size([4])" in output
    out, conformity = namespace["out"], namespace["conformity"]
    assert out.shape == conformity.shape == (4, 10)
    assert bool((conformity.abs() <= 1 + 1e-6).all())  # cosine similarities
    namespace, output = _run_tutorial(CUSTOM_METRIC, monkeypatch)
    evals = namespace["evals"]
    assert evals.shape == (2, 2, 4)
    assert bool((evals[:, :, 0] >= evals[:, :, 1]).all())  # a restriction never helps
    assert "BalancedAccuracy() / BalancedAccuracy(min_tnr=0.95) / MCC() / AUC()" in " ".join(
        output.split()
    )


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
