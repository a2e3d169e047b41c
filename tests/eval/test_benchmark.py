"""Benchmark helpers: joint fitting, batched confidences, metrics, tables and plots."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import io
import re
import sys
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from rich.console import Console
from rich.progress import Progress
from torch import Tensor, nn

from scio.eval import (
    AUC,
    FPR,
    TPR,
    compute_confidence,
    compute_metrics,
    fit_scores,
    histogram_oods,
    roc_scores,
    summary,
    summary_plot,
    summary_table,
)
from scio.eval.classification.benchmark import ScoreClassifAndLayers, _score_and_layers_str
from scio.eval.classification.tables import _optimal_rows, _summary_table
from scio.scores import KNN, BaseScoreClassif

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class SmallNet(nn.Module):
    """conv (1,1) -> relu (1,2) -> pool (1,3) -> flatten (1,4) -> fc (1,5); 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


class MaxLogit(BaseScoreClassif):
    """Test score: conformity = logits (so the predicted-class conformity is the max logit).

    Records the sizes of the batches it sees at inference.
    """

    def calibrate(self, calib_data: Tensor, calib_labels: Any) -> None:
        self.n_calib = len(calib_data)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        self.__dict__.setdefault("seen", []).append(len(inputs))
        out = self.rnet(inputs)
        return out, out


@pytest.fixture(scope="module")
def net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet().eval()


@pytest.fixture(scope="module")
def data() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "calib": torch.rand(40, 3, 6, 6, generator=gen),
        "labels": torch.randint(0, 3, (40,), generator=gen),
        "ind": torch.rand(30, 3, 6, 6, generator=gen),
        "ood1": torch.rand(25, 3, 6, 6, generator=gen) * 3,
        "ood2": -torch.rand(20, 3, 6, 6, generator=gen),
    }


@pytest.fixture
def fitted(net: SmallNet, data: dict[str, Tensor]) -> list[ScoreClassifAndLayers]:
    pairs: list[ScoreClassifAndLayers] = [(MaxLogit(), []), (KNN(k=3), [(1, 3)])]
    fit_scores(pairs, net, data["calib"], data["labels"], show_progress=False)
    return pairs


# -- display strings ---------------------------------------------------------------------------


def test_score_and_layers_str() -> None:
    assert _score_and_layers_str((KNN(k=31), [(1, 11)])) == "KNN(k=31)\n↳ (1, 11)"
    assert _score_and_layers_str((KNN(k=31), [(1, 5), (1, 11)])) == "KNN(k=31)\n↳ (1, 5), (1, 11)"
    assert _score_and_layers_str((MaxLogit(), [])) == "MaxLogit()"
    assert _score_and_layers_str(None) == ""


# -- fitting -----------------------------------------------------------------------------------


def test_fit_scores_delegates_to_fit_jointly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []

    def fake_fit_jointly(
        pairs,
        net,
        calib_data,
        calib_labels=None,
        *,
        batch_size=None,
        on_batch=None,
        distributed=False,
    ):  # type: ignore[no-untyped-def]
        calls.append((pairs, net, calib_data, calib_labels, batch_size))
        for done in (4, 8, 10):
            on_batch(done)
        return [score for score, _ in pairs]

    monkeypatch.setattr("scio.scores.fit_jointly", fake_fit_jointly)
    pairs = [(MaxLogit(), []), (KNN(k=1), [(1, 3)])]
    calib = torch.zeros(10, 3, 6, 6)
    result = fit_scores(iter(pairs), "net", calib, "labels", batch_size=4)  # type: ignore[arg-type]
    assert result == [pairs[0][0], pairs[1][0]]
    assert len(calls) == 1  # one joint pass for every score
    assert calls[0][1:] == ("net", calib, "labels", 4)
    assert [tuple(p) for p in calls[0][0]] == pairs
    out = capsys.readouterr().out
    # the reference's final line: elapsed time, title, bar, scores done, "Done"
    assert re.search(r"^\d+:\d\d:\d\d Fitting Scores\.\.\. \(10 samples\) ━+ 2/2 Done\s*$", out)


def test_fit_scores_one_forward_per_batch(net: SmallNet, data: dict[str, Tensor]) -> None:
    batch_sizes: list[int] = []
    handle = net.register_forward_hook(lambda _m, args, _o: batch_sizes.append(len(args[0])))
    try:
        scores = fit_scores(
            [(MaxLogit(), []), (KNN(k=2), [(1, 3)]), (KNN(k=3), [(1, 1), (1, 5)])],
            net,
            data["calib"],
            data["labels"],
            batch_size=16,
            show_progress=False,
        )
    finally:
        handle.remove()
    assert all(score.is_fit for score in scores)
    assert scores[0].n_calib == 40  # type: ignore[attr-defined]
    # torchinfo summaries use 1-sample inputs; calibration: 3 batches for all 3 scores.
    assert [n for n in batch_sizes if n > 1] == [16, 16, 8]


def test_fit_scores_accepts_batches(net: SmallNet, data: dict[str, Tensor]) -> None:
    calib, labels = data["calib"], data["labels"]
    batches = [(calib[i : i + 10], labels[i : i + 10]) for i in range(0, 40, 10)]
    (knn_batches,) = fit_scores([(KNN(k=2), [(1, 3)])], net, batches, show_progress=False)
    (knn_tensor,) = fit_scores([(KNN(k=2), [(1, 3)])], net, calib, show_progress=False)
    torch.testing.assert_close(knn_batches(data["ind"])[1], knn_tensor(data["ind"])[1])


# -- confidences -------------------------------------------------------------------------------


def test_compute_confidence_values_and_shapes(
    net: SmallNet, data: dict[str, Tensor], fitted: list[ScoreClassifAndLayers]
) -> None:
    scores = [score for score, _ in fitted]
    confs_ind, confs_oods = compute_confidence(
        scores, ind=data["ind"], oods=(data["ood1"], data["ood2"]), show_progress=False
    )
    assert confs_ind.shape == (2, 30)
    assert [c.shape for c in confs_oods] == [(2, 25), (2, 20)]
    assert confs_ind.dtype == np.float64
    with torch.no_grad():
        expected = net(data["ind"]).max(1).values.double().numpy()
    np.testing.assert_allclose(confs_ind[0], expected, rtol=1e-5, atol=1e-6)
    # KNN: conformity of the predicted class (class-independent here).
    knn = scores[1]
    out, conformity = knn(data["ood2"])
    np.testing.assert_allclose(
        confs_oods[1][1], conformity[torch.arange(20), out.argmax(1)].double().numpy()
    )


def test_compute_confidence_is_batched(data: dict[str, Tensor], fitted: list) -> None:
    scores = [score for score, _ in fitted]
    score = scores[0]
    score.seen = []
    batched = compute_confidence(
        scores, ind=data["ind"], oods=data["ood1"], batch_size=7, show_progress=False
    )
    assert score.seen == [7, 7, 7, 7, 2, 7, 7, 7, 4]  # never more than 7 inputs at once
    whole = compute_confidence(
        scores, ind=data["ind"], oods=[data["ood1"]], batch_size=None, show_progress=False
    )
    np.testing.assert_allclose(batched[0], whole[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[1][0], whole[1][0], rtol=1e-5, atol=1e-6)
    # Iterables of batches (tensors or (inputs, labels) tuples) work too.
    loader = [(data["ind"][i : i + 8], None) for i in range(0, 30, 8)]
    tensors = [data["ood1"][i : i + 10] for i in range(0, 25, 10)]
    from_iter = compute_confidence(scores, ind=loader, oods=[tensors], show_progress=False)
    np.testing.assert_allclose(from_iter[0], whole[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_iter[1][0], whole[1][0], rtol=1e-5, atol=1e-6)


def test_compute_confidence_progress(
    data: dict[str, Tensor], fitted: list, capsys: pytest.CaptureFixture[str]
) -> None:
    compute_confidence(
        [fitted[0][0]],
        ind=data["ind"],
        oods=(data["ood1"], data["ood2"]),
        oods_title=("Bright", "Negative"),
    )
    out = capsys.readouterr().out
    # the reference's final line (the per-set bars are dropped once each set is done)
    assert re.search(r"^\d+:\d\d:\d\d Computing confidences\.\.\. ━+ 1/1 Done\s*$", out)


def test_compute_confidence_progress_per_set(
    data: dict[str, Tensor], fitted: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a set runs, its own bar (in samples) is shown below the scores' bar."""
    seen: list[str] = []
    original = Progress.add_task

    def add_task(self: Progress, description: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(description)
        return original(self, description, *args, **kwargs)

    monkeypatch.setattr(Progress, "add_task", add_task)
    compute_confidence(
        [fitted[0][0]],
        ind=data["ind"],
        oods=(data["ood1"], data["ood2"]),
        oods_title=("Bright", "Negative"),
    )
    assert seen[1:] == [
        "↳ In-Distribution (30 samples)",
        "↳ OoD 1: Bright (25 samples)",
        "↳ OoD 2: Negative (20 samples)",
    ]


# -- metrics and tables ------------------------------------------------------------------------

RNG = np.random.default_rng(0)
CONFS_IND = RNG.normal(size=(3, 200)) + 2
CONFS_OODS = (
    RNG.normal(size=(3, 150)) + np.array([[1.5], [1.0], [0.0]]),
    RNG.normal(size=(3, 100)) * np.array([[1.0], [3.0], [0.5]]),
)
PAIRS: list[ScoreClassifAndLayers] = [
    (KNN(k=31), [(1, 11)]),
    (KNN(k=5, index_metric="ip"), [(1, 5), (1, 12)]),
    (MaxLogit(), []),
]


def test_compute_metrics() -> None:
    metrics = (AUC(), TPR(max_fpr=0.05), FPR())
    evals = compute_metrics(CONFS_IND, CONFS_OODS, metrics)
    assert evals.shape == (3, 2, 3)
    labels = np.r_[np.zeros(200, bool), np.ones(100, bool)]
    for i in range(3):
        for m, metric in enumerate(metrics):
            expected = metric(labels, np.r_[CONFS_IND[i], CONFS_OODS[1][i]])
            assert evals[i, 1, m] == expected


def _render(table: Any) -> str:
    console = Console(width=140, file=io.StringIO(), color_system=None, record=True)
    console.print(table)
    return console.export_text()


def test_summary_table_content(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = (AUC(max_fpr=0.2), TPR(max_fpr=0.05))
    evals = compute_metrics(CONFS_IND, CONFS_OODS, metrics)
    titles = ("Gaussian (shifted)", "Gaussian wide")
    table = _summary_table(
        evals, scores_and_layers=PAIRS, oods_title=titles, metrics=metrics, baseline=2
    )
    text = _render(table)
    lines = text.splitlines()
    assert lines[0].strip() == "Evaluation of 3 scores against 2 OoD sets and 2 metrics:"
    assert lines[1].strip() == "AUC(max_fpr=0.2) / TPR(max_fpr=0.05)"
    assert "┃ Scores" in lines[3] and "OoD 1:" in lines[3] and "OoD 2:" in lines[3]
    assert "↳ Recorded layers" in lines[4] and "Gaussian (shifted)" in lines[4]
    assert "Gaussian wide" in lines[4]
    for i, expected_name in enumerate(["KNN(k=31)", "KNN(k=5, index_metric='ip')", "MaxLogit()"]):
        row = [line for line in lines if line.startswith(f"│ {expected_name} ")]
        assert len(row) == 1, expected_name
        cells = [cell.strip() for cell in row[0].split("│")[2:-1]]
        assert cells == [" / ".join(f"{v:.3f}" for v in evals[i, j]) for j in range(2)]
    assert "│ ↳ (1, 5), (1, 12)" in text
    assert text.rstrip().splitlines()[-1].startswith("╰")
    # Highlighting: column best in gold3, better than the baseline in bold, baseline underlined.
    markup = [list(column.cells) for column in table.columns[1:]]
    for j in range(2):
        for m in range(2):
            best_row = int(np.argmax(evals[:, j, m]))
            assert "gold3" in markup[j][best_row].split(" / ")[m]
            for i in range(2):
                is_bold = "bold" in markup[j][i].split(" / ")[m]
                assert is_bold == (evals[i, j, m] > evals[2, j, m])
    assert table.rows[2].style == "underline"
    assert table.rows[0].style is None
    # Printed with rich on stdout.
    summary_table(evals, metrics=metrics)
    out = " ".join(capsys.readouterr().out.split())  # the title wraps in narrow terminals
    assert "Evaluation of 3 scores against 2 OoD sets and 2 metrics" in out
    assert "Score 1" in out and "OoD 2" in out


def test_summary_table_lower_is_better_and_no_baseline() -> None:
    metrics = (FPR(),)
    evals = compute_metrics(CONFS_IND, CONFS_OODS, metrics)
    table = _summary_table(evals, metrics=metrics)
    markup = list(table.columns[1].cells)
    best_row = int(np.argmin(evals[:, 0, 0]))
    assert "gold3" in markup[best_row]
    assert all("bold" in cell for cell in markup)  # without baseline everything is bold
    assert table.columns[0].header == "Scores"
    assert table.columns[1].header == "OoD 1"


def test_summary_table_escapes_markup() -> None:
    text = _render(_summary_table(np.full((1, 1, 1), 0.5), oods_title=["[red]A[/red]"]))
    assert "[red]A[/red]" in text
    assert "0.500" in text


# -- plots -------------------------------------------------------------------------------------


def _save_png(fig: Any, path: Path) -> None:
    fig.savefig(path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_histogram_oods(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    returned = histogram_oods(
        CONFS_IND[0],
        [c[0] for c in CONFS_OODS],
        oods_title=("Shifted", "Wide"),
        score_and_layers=PAIRS[0],
        ax=ax,
        stat="density",
        common_norm=False,
        bins=20,
    )
    assert returned is ax
    assert ax.get_title() == "KNN(k=31)\n↳ (1, 11)"
    assert ax.get_xlabel() == "Confidence score"
    assert ax.get_ylabel() == "Density"
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "Dataset"
    assert [t.get_text() for t in legend.get_texts()] == ["In-Distribution", "Shifted", "Wide"]
    # Density per dataset integrates to 1 (common_norm=False).
    for patch in ax.patches[::2]:
        stairs = patch.get_data()  # type: ignore[attr-defined]
        assert np.sum(stairs.values * np.diff(stairs.edges)) == pytest.approx(1)
    _save_png(fig, tmp_path / "hist.png")
    plt.close(fig)


def test_histogram_defaults_and_non_finite(tmp_path: Path) -> None:
    fig = plt.figure()
    ind = np.r_[CONFS_IND[0], np.inf]
    ax = histogram_oods(ind, [CONFS_OODS[0][0]], stat="count")
    assert ax.get_title() == ""
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["In-Distribution", "OoD 1"]
    assert ax.patches[0].get_data().values.sum() == 200  # type: ignore[attr-defined]  # +inf left out
    with pytest.raises(ValueError, match="Unsupported stat 'median'"):
        histogram_oods(ind, [CONFS_OODS[0][0]], stat="median")
    _save_png(fig, tmp_path / "hist_default.png")
    plt.close(fig)


@pytest.mark.parametrize("hull_kw", [{}, {"convex_hull": True}, {"show_convex_hull": True}])
def test_roc_scores(tmp_path: Path, hull_kw: dict) -> None:
    fig, ax = plt.subplots()
    returned = roc_scores(CONFS_IND, CONFS_OODS[0], scores_and_layers=PAIRS, ax=ax, **hull_kw)
    assert returned is ax
    assert ax.get_title() == "Out-of-Distribution"
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "Scores"
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[:3] == [_score_and_layers_str(pair) for pair in PAIRS]
    assert ("Convex Hull" in texts) == bool(hull_kw)
    _save_png(fig, tmp_path / "roc_scores.png")
    plt.close(fig)


def test_roc_scores_without_legend() -> None:
    fig = plt.figure()
    ax = roc_scores(CONFS_IND, CONFS_OODS[1], ood_title="Wide", legend=False)
    assert ax.get_title() == "Wide"
    assert ax.get_legend() is None
    plt.close(fig)


def test_summary_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Figures never need seaborn (an optional extra): make importing it fail.
    monkeypatch.setitem(sys.modules, "seaborn", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    shown = []
    monkeypatch.setattr(plt, "show", lambda block=None: shown.append(block))
    path = tmp_path / "summary_plot.png"
    fig = summary_plot(
        CONFS_IND,
        CONFS_OODS,
        scores_and_layers=PAIRS,
        oods_title=("Shifted", "Wide"),
        convex_hull=True,
        block=False,
        save=path,
        ax="ignored",
        return_figure=True,
    )
    assert fig is not None
    assert shown == [False]
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert len(fig.axes) == 3 + 2
    hists, rocs = fig.axes[:3], fig.axes[3:]
    assert [ax.get_title() for ax in hists] == [_score_and_layers_str(p) for p in PAIRS]
    assert [ax.get_title() for ax in rocs] == ["Shifted", "Wide"]
    # Only the leftmost histogram legend; the ROC legend is a figure legend below the ROCs.
    assert [ax.get_legend() is not None for ax in fig.axes] == [True, False, False, False, False]
    assert len(fig.legends) == 1
    assert hists[0].get_ylabel() == "Density"
    assert hists[0].get_yticks().size == 0
    plt.close(fig)


def test_summary_plot_legend_pair_and_no_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plt, "show", lambda block=None: pytest.fail("shown"))
    fig = summary_plot(
        CONFS_IND[:1],
        [c[:1] for c in CONFS_OODS],
        legend=(False, True),
        show=False,
        return_figure=True,
    )
    assert fig is not None
    assert [ax.get_legend() is not None for ax in fig.axes] == [False, False, False]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Score 1"]
    assert fig.axes[0].get_title() == "Score 1"
    plt.close(fig)


def test_summary_and_summary_plot_return_none_as_the_reference(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reference's ``summary``/``summary_plot`` draw and return ``None``, leaving the
    figure open in pyplot (its ``plt.show()`` displays it); ``return_figure=True`` returns it."""
    plt.close("all")
    shown: list[bool | None] = []
    monkeypatch.setattr(plt, "show", lambda block=None: shown.append(block))
    assert summary_plot(CONFS_IND, CONFS_OODS, block=False) is None
    assert shown == [False]
    assert len(plt.get_fignums()) == 1
    assert len(plt.gcf().axes) == 3 + 2
    assert summary(CONFS_IND, CONFS_OODS, metrics=(AUC(),), show=False) is None
    assert "Evaluation of 3 scores" in capsys.readouterr().out
    assert len(plt.get_fignums()) == 2
    fig = summary(CONFS_IND, CONFS_OODS, show=False, return_figure=True)
    assert fig is plt.gcf()
    assert shown == [False]
    plt.close("all")


def test_summary_optimal_only_and_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = (AUC(),)
    evals = compute_metrics(CONFS_IND, CONFS_OODS, metrics)
    best = set(np.argmax(evals[:2, :, 0], axis=0).tolist())  # baseline 2 excluded from max
    fig = summary(
        CONFS_IND,
        CONFS_OODS,
        scores_and_layers=PAIRS,
        metrics=metrics,
        baseline=2,
        optimal_only=True,
        show=False,
        save=tmp_path / "summary.png",
        return_figure=True,
    )
    assert fig is not None
    out = " ".join(capsys.readouterr().out.split())
    kept = sorted(best | {2})
    plural = "s" if len(kept) > 1 else ""
    assert f"Evaluation of {len(kept)} score{plural} against 2 OoD sets and 1 metric" in out
    assert "MaxLogit()" in out
    assert len(fig.axes) == len(kept) + 2
    assert (tmp_path / "summary.png").read_bytes()[:8] == PNG_MAGIC
    plt.close(fig)


def test_summary_without_metrics_prints_no_table(capsys: pytest.CaptureFixture[str]) -> None:
    fig = summary(CONFS_IND, CONFS_OODS, optimal_only=True, show=False, return_figure=True)
    assert fig is not None
    assert capsys.readouterr().out == ""
    assert len(fig.axes) == 3 + 2
    plt.close(fig)


def test_optimal_rows() -> None:
    evals = np.array([[[0.5, 0.1]], [[0.9, 0.3]], [[0.7, 0.2]], [[0.95, 0.0]]])
    assert _optimal_rows(evals, None, None) == [1, 3]
    assert _optimal_rows(evals, None, 3) == [1, 3]  # baseline kept, not compared
    assert _optimal_rows(evals, (AUC(), FPR()), None) == [3]  # FPR: lower is better


# -- end to end on the tutorial model ----------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_on_tutorial_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scio.models import tiniest

    net = tiniest().eval()
    gen = torch.Generator().manual_seed(0)
    calib = torch.rand(24, 3, 32, 32, generator=gen)
    ind = torch.rand(16, 3, 32, 32, generator=gen)
    oods = (ind.flip(2), ind * 0.5)
    pairs: list[ScoreClassifAndLayers] = [(KNN(k=4), [(1, 11)]), (MaxLogit(), [])]
    scores = fit_scores(pairs, net, calib, None, batch_size=16)
    confs_ind, confs_oods = compute_confidence(
        scores, ind=ind, oods=oods, oods_title=("Flip", "Darker"), batch_size=8
    )
    assert confs_ind.shape == (2, 16)
    assert np.isfinite(confs_ind).all()
    fig = summary(
        confs_ind,
        confs_oods,
        scores_and_layers=pairs,
        oods_title=("Flip", "Darker"),
        metrics=(AUC(), FPR()),
        show=False,
        save=tmp_path / "tutorial.png",
    )
    assert fig is None  # as the reference; the figure stays open in pyplot
    assert "KNN(k=4)" in capsys.readouterr().out
    plt.close("all")


def test_fit_scores_charges_each_score_only_its_own_work(
    net: SmallNet, data: dict[str, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared forward (made to last 500 s by a fake clock) is charged to no score's
    calibration entry; each timer reports it in ``timer.shared`` instead."""
    import scio.scores.joint.fit as joint_module

    ticks = iter(range(0, 10**6, 500))
    monkeypatch.setattr(joint_module, "perf_counter", lambda: float(next(ticks)))
    scores = fit_scores(
        [(MaxLogit(), []), (KNN(k=2), [(1, 3)])],
        net,
        data["calib"],
        data["labels"],
        batch_size=16,
        show_progress=False,
    )
    for score in scores:
        (entry,) = score.timer.calibration
        assert entry.n_samples == 40
        assert entry.duration < 500  # its own work only, not the 3 x 500 s shared forwards
        assert score.timer.shared == {"calibration": 3 * 500.0}
