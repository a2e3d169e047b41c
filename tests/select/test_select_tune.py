"""`scio.select.tune`: against an independent brute-force loop, forward counts, bad inputs."""

from __future__ import annotations

import csv
import io
import itertools
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from tests.conftest import make_net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores import KNN, ODIN, DeepMahalanobis, Energy, ReAct, ViM
from scio.select import TuneResult, tune

FEAT, LOGITS = (1, 4), (1, 5)


# -- independent metrics (naive definitions, no scio.eval) --------------------------------------
def naive_auroc(ind: np.ndarray, ood: np.ndarray) -> float:
    """Fraction of (InD, OoD) pairs ranked correctly; ties count as wrong (scio's
    pessimistic AUROC)."""
    return float(np.mean([[a > b for b in ood] for a in ind]))


def naive_fpr95(ind: np.ndarray, ood: np.ndarray) -> float:
    """Smallest fraction of OoD accepted (score > tau) over the thresholds keeping at least
    95 % of InD (score > tau)."""
    best = 1.0
    for tau in [-np.inf, *ind, *ood]:
        if np.mean(ind > tau) >= 0.95:
            best = min(best, float(np.mean(ood > tau)))
    return best


def naive_aupr(ind: np.ndarray, ood: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(ind)), np.ones(len(ood))]
    return float(average_precision_score(labels, -np.r_[ind, ood]))


NAIVE = {"auroc": naive_auroc, "fpr@95": naive_fpr95, "aupr": naive_aupr}


# -- data ------------------------------------------------------------------------------------------
def _data(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    net = make_net(dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    calib = torch.randn(40, 1, 4, 4, generator=gen).to(dtype)
    val_id = torch.randn(30, 1, 4, 4, generator=gen).to(dtype)
    val_ood = (1.5 * torch.randn(24, 1, 4, 4, generator=gen) + 0.5).to(dtype)
    with torch.no_grad():
        labels = net(calib).argmax(1)
    return {"net": net, "calib": calib, "labels": labels, "val_id": val_id, "val_ood": val_ood}


def _recorder(net: nn.Module, calib: torch.Tensor, *layers: Any) -> Recorder:
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record(*layers)
    return rnet


def _brute_force(score_type: type, base: dict, points: list[dict], layers: tuple, data: dict,
                 metric: str) -> list[float]:  # fmt: skip
    """Fit every grid point on its own recorder, score the validation data alone."""
    values = []
    for point in points:
        score = score_type(**{**base, **point})
        score.fit(_recorder(data["net"], data["calib"], *layers), data["calib"], data["labels"])
        ind = score.confidence(data["val_id"]).double().numpy()
        ood = score.confidence(data["val_ood"]).double().numpy()
        values.append(NAIVE[metric](ind, ood))
    return values


CASES = [
    ("KNN", KNN, {"k": 3}, {"k": [1, 2, 5, 9]}, (FEAT,)),
    ("ReAct", ReAct, {}, {"percentile": [50.0, 80.0, 95.0], "readout": ["softmax", "energy"]},
     (FEAT,)),
    ("Energy", Energy, {}, {"temperature": [0.5, 1.0, 4.0]}, ()),
    ("DeepMahalanobis", DeepMahalanobis, {}, {"act_norm": [None, 2.0]}, (FEAT, LOGITS)),
    ("ODIN", ODIN, {"temperature": 1.0}, {"temperature": [1.0, 100.0], "epsilon": [0.0, 0.05]},
     ()),
    ("ViM", ViM, {}, [{"dim": 2}, {"dim": 5}, {"dim": 3}], (FEAT,)),
]  # fmt: skip


def _points(grid: Any) -> list[dict]:
    if isinstance(grid, dict):
        return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    return list(grid)


# the fast loop: three kinds of score (feature bank, shaped forward, logits) with AUROC, and
# the other two metrics on KNN; every case and metric runs in CI
_FAST = {("KNN", "auroc"), ("ReAct", "auroc"), ("Energy", "auroc"), ("KNN", "fpr@95"),
         ("KNN", "aupr")}  # fmt: skip
BRUTE_FORCE = [
    pytest.param(
        *case, metric, id=f"{case[0]}-{metric}",
        marks=() if (case[0], metric) in _FAST else pytest.mark.slow,
    )
    for case in CASES
    for metric in ("auroc", "fpr@95", "aupr")
]  # fmt: skip


@pytest.mark.parametrize(("name", "score_type", "base", "grid", "layers", "metric"), BRUTE_FORCE)
def test_table_and_best_equal_brute_force(
    name: str, score_type: type, base: dict, grid: Any, layers: tuple, metric: str
) -> None:
    data = _data()
    rnet = _recorder(data["net"], data["calib"], *layers)
    result = tune(
        score_type(**base), grid, rnet, data["calib"], data["val_id"], data["val_ood"],
        calib_labels=data["labels"], metric=metric, batch_size=None, show_progress=False,
    )  # fmt: skip
    points = _points(grid)
    expected = _brute_force(score_type, base, points, layers, data, metric)
    assert len(result.table) == len(points)
    for j, (row, point) in enumerate(zip(result.table, points)):
        assert row["point"] == j
        assert {key: row[key] for key in point} == point
    np.testing.assert_allclose(result.table.values(), expected, rtol=0, atol=1e-12)
    # the best: first best value in grid order (ties), lower is better for fpr@95
    target = min(expected) if metric == "fpr@95" else max(expected)
    best = expected.index(target)
    assert result.best_index == best
    assert result.best_params == points[best]
    assert result.metric == metric and result.best_value == pytest.approx(target, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_score_equals_a_fresh_fit_with_best_params(dtype: torch.dtype) -> None:
    data = _data(dtype)
    rnet = _recorder(data["net"], data["calib"], FEAT)
    result = tune(KNN(k=3), {"k": [1, 4, 7]}, rnet, data["calib"], data["val_id"],
                  data["val_ood"], batch_size=None, show_progress=False)  # fmt: skip
    fresh = KNN(**{"k": 3, **result.best_params}).fit(rnet, data["calib"])
    test = torch.randn(11, 1, 4, 4, dtype=dtype)
    out_t, conf_t = result.score(test)
    out_f, conf_f = fresh(test)
    assert torch.equal(out_t, out_f) and torch.equal(conf_t, conf_f)
    assert result.score.is_fit and result.score.k == result.best_params["k"]
    # the stored validation confidences are the chosen score's
    np.testing.assert_array_equal(
        result.val_confidences[0], fresh.confidence(data["val_id"]).double().numpy()
    )


def test_batched_search_matches_one_batch() -> None:
    data = _data()
    rnet = _recorder(data["net"], data["calib"], FEAT)
    args = (rnet, data["calib"], data["val_id"], data["val_ood"])
    one = tune(KNN(k=2), {"k": [1, 2, 6]}, *args, batch_size=None, show_progress=False)
    batched = tune(KNN(k=2), {"k": [1, 2, 6]}, *args, batch_size=7, show_progress=False)
    loaders = tune(
        KNN(k=2), {"k": [1, 2, 6]}, rnet,
        DataLoader(TensorDataset(data["calib"], data["labels"]), batch_size=9),
        DataLoader(TensorDataset(data["val_id"]), batch_size=8),
        DataLoader(TensorDataset(data["val_ood"]), batch_size=5), show_progress=False,
    )  # fmt: skip
    for other in (batched, loaders):
        np.testing.assert_allclose(other.table.values(), one.table.values(), atol=1e-6)
        assert other.best_params == one.best_params


def test_deterministic_and_ties_broken_by_grid_order() -> None:
    data = _data()
    rnet = _recorder(data["net"], data["calib"], FEAT)
    args = (rnet, data["calib"], data["val_id"], data["val_ood"])
    # k=4 three times: identical values, the first one wins; runs give identical tables
    first = tune(KNN(k=1), [{"k": 9}, {"k": 4}, {"k": 4}, {"k": 4}], *args, show_progress=False)
    again = tune(KNN(k=1), [{"k": 9}, {"k": 4}, {"k": 4}, {"k": 4}], *args, show_progress=False)
    assert first.table.rows == again.table.rows
    values = first.table.values()
    assert values[1] == values[2] == values[3]
    if values[1] >= values[0]:
        assert first.best_index == 1
    # a parameter that does not change the score (act_norm=None vs an equal grid): first wins
    tied = tune(Energy(), {"temperature": [2.0, 2.0]}, *args, show_progress=False)
    assert tied.best_index == 0


def test_table_sorts_and_writes_csv(tmp_path: Any) -> None:
    data = _data()
    rnet = _recorder(data["net"], data["calib"], FEAT)
    args = (rnet, data["calib"], data["val_id"], data["val_ood"])
    result = tune(KNN(k=1), {"k": [1, 3, 6, 9]}, *args, show_progress=False)
    ranked = result.table.sorted()
    assert list(ranked.values()) == sorted(result.table.values(), reverse=True)
    assert ranked[0]["point"] == result.best_index
    assert [row["k"] for row in result.table.sorted("k", descending=True)] == [9, 6, 3, 1]
    fpr = tune(KNN(k=1), {"k": [1, 3, 6, 9]}, *args, metric="fpr@95", show_progress=False)
    assert list(fpr.table.sorted().values()) == sorted(fpr.table.values())  # lower first
    text = result.table.to_csv(tmp_path / "table.csv")
    assert (tmp_path / "table.csv").read_text() == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["k"]) for r in rows] == [1, 3, 6, 9]
    assert [float(r["auroc"]) for r in rows] == list(result.table.values())
    assert "auroc" in str(result.table) and isinstance(result, TuneResult)


# -- forward counts ----------------------------------------------------------------------------
class CountingNet(nn.Module):
    """Counts forward calls, by batch size."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):  # not while torch.fx traces the network
            self.sizes.append(int(x.shape[0]))
        return self.net(x)

    def data_forwards(self) -> int:
        """Forwards on data batches (probes of one or two inputs left out: each recorder's
        torchinfo summary, head discovery, the tail check of shaped forwards)."""
        return sum(size > 2 for size in self.sizes)


COUNT_CASES = [
    pytest.param(KNN(k=2), "k", [1, 2, 3, 4], ("net.flatten",), id="KNN"),
    pytest.param(ReAct(), "percentile", [50.0, 70.0, 90.0, 99.0], ("net.flatten",), id="ReAct"),
    pytest.param(Energy(), "temperature", [0.5, 1.0, 2.0, 4.0], (), id="Energy",
                 marks=pytest.mark.slow),
    pytest.param(DeepMahalanobis(), "act_norm", [None, 1.0, 2.0, 3.0], ("net.flatten",),
                 id="DeepMahalanobis", marks=pytest.mark.slow),
    pytest.param(ViM(), "dim", [1, 2, 3, 4], ("net.flatten",), id="ViM",
                 marks=pytest.mark.slow),
    pytest.param(ODIN(temperature=1.0), "temperature", [1.0, 10.0, 100.0, 1000.0], (),
                 id="ODIN-no-gradient", marks=pytest.mark.slow),
]  # fmt: skip


@pytest.mark.parametrize(("score", "param", "values", "layers"), COUNT_CASES)
def test_forward_count_does_not_grow_with_the_grid(
    score: Any, param: str, values: list, layers: tuple
) -> None:
    data = _data()
    counting = CountingNet(data["net"]).eval()
    rnet = _recorder(counting, data["calib"], *layers)
    counts = []
    for n_points in (1, 4):
        counting.sizes.clear()
        tune(score, {param: values[:n_points]}, rnet, data["calib"], data["val_id"],
             data["val_ood"], calib_labels=data["labels"], batch_size=10,
             show_progress=False)  # fmt: skip
        counts.append(counting.data_forwards())
    n_batches = 4 + 3 + 3  # calibration 40/10, validation 30/10 and 24/10
    assert counts == [n_batches, n_batches]


def test_input_gradient_points_run_their_own_passes() -> None:
    data = _data()
    counting = CountingNet(data["net"]).eval()
    rnet = _recorder(counting, data["calib"])
    counts = []
    for n_points in (1, 2):
        counting.sizes.clear()
        tune(ODIN(temperature=1.0), {"epsilon": [0.01, 0.02][:n_points]}, rnet, data["calib"],
             data["val_id"][:10], data["val_ood"][:10], batch_size=10,
             show_progress=False)  # fmt: skip
        counts.append(counting.data_forwards())
    # one shared forward per calibration batch (4), then each input-gradient grid point runs
    # the same passes of its own over the validation data
    assert counts[1] - counts[0] == counts[0] - 4 > 0


# -- bad input: a clear ValueError before any forward -----------------------------------------
BAD = [
    ({"k": [1, 2], "kk": [3]}, {}, ValueError, r"unknown parameter\(s\) \['kk'\] of KNN"),
    ({}, {}, ValueError, r"`grid` is empty"),
    ([], {}, ValueError, r"`grid` is an empty list"),
    ({"k": []}, {}, ValueError, r"`grid\['k'\]` is an empty list"),
    ({"k": 3}, {}, ValueError, r"must be a list of values"),
    ({"k": [1]}, {"metric": "accuracy"}, ValueError, r"`metric` must be one of"),
    ({"k": ["three"]}, {}, TypeError, r"Parameter `k` of KNN must be int"),
]


@pytest.mark.parametrize(("grid", "kwargs", "error", "match"), BAD)
def test_bad_grid_raises_before_any_forward(grid: Any, kwargs: dict, error: type,
                                            match: str) -> None:  # fmt: skip
    data = _data()
    counting = CountingNet(data["net"]).eval()
    rnet = _recorder(counting, data["calib"], "net.flatten")
    counting.sizes.clear()
    score = KNN(k=2)
    with pytest.raises(error, match=match):
        tune(score, grid, rnet, data["calib"], data["val_id"], data["val_ood"],
             show_progress=False, **kwargs)  # fmt: skip
    assert counting.sizes == []
    assert score.k == 2 and not score.is_fit  # the user's score is never modified


@pytest.mark.parametrize(
    ("val_id", "val_ood", "match"),
    [
        ((30, 1, 4, 4), (24, 1, 5, 5), r"`val_ood` samples have shape \(1, 5, 5\) but `val_id`"),
        ((30, 2, 4, 4), (24, 2, 4, 4), r"`val_id` samples have shape \(2, 4, 4\) but `calib"),
        ((0, 1, 4, 4), (24, 1, 4, 4), r"`val_id` must hold at least one sample"),
    ],
)
def test_bad_validation_data_raises_before_any_forward(val_id: tuple, val_ood: tuple,
                                                       match: str) -> None:  # fmt: skip
    data = _data()
    counting = CountingNet(data["net"]).eval()
    rnet = _recorder(counting, data["calib"], "net.flatten")
    counting.sizes.clear()
    with pytest.raises(ValueError, match=match):
        tune(KNN(k=2), {"k": [1, 2]}, rnet, data["calib"], torch.randn(val_id),
             torch.randn(val_ood), show_progress=False)  # fmt: skip
    assert counting.sizes == []


def test_bad_types() -> None:
    data = _data()
    rnet = _recorder(data["net"], data["calib"], FEAT)
    args = (data["calib"], data["val_id"], data["val_ood"])
    with pytest.raises(TypeError, match="`rnet` must be a scio Recorder"):
        tune(KNN(k=2), {"k": [1]}, data["net"], *args, show_progress=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        tune(KNN(k=2), {"k": [1]}, rnet, data["calib"], iter([data["val_id"]]),
             data["val_ood"], show_progress=False)  # fmt: skip
    with pytest.raises(TypeError, match="must be a scio classification score"):
        tune("KNN", {"k": [1]}, rnet, *args, show_progress=False)  # type: ignore[arg-type]
