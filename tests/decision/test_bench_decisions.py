"""The decision column of ``scio bench``: conformal decisions at a guaranteed 5 % rate."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from rich.console import Console

from scio.bench.runner import DECISION_ALPHA, conformal_decisions


def test_conformal_decisions_against_naive() -> None:
    rng = np.random.default_rng(0)
    ind = np.round(rng.normal(size=(2, 101)), 1)  # ties
    oods = (rng.normal(-1.0, 1.0, size=(2, 40)), rng.normal(0.5, 1.0, size=(2, 7)))
    out = conformal_decisions(ind, oods, 0.1, seed=3)
    perm = np.random.default_rng(3).permutation(101)
    holdout, test = perm[:50], perm[50:]
    for i in range(2):
        h = ind[i, holdout]

        def rate(values: np.ndarray, h: np.ndarray = h) -> float:
            p = [(1 + sum(x <= v for x in h)) / (len(h) + 1) for v in values]
            return float(np.mean([q <= 0.1 for q in p]))

        expected = [rate(ind[i, test]), rate(oods[0][i]), rate(oods[1][i])]
        assert out[i].tolist() == pytest.approx(expected, abs=0, rel=0)
    assert DECISION_ALPHA == 0.05


def test_conformal_decisions_nan_score_gives_nan_row() -> None:
    ind = np.zeros((2, 40))
    ind[1, 3] = math.nan
    out = conformal_decisions(ind, (np.zeros((2, 5)),), 0.1)
    assert not np.isnan(out[0]).any() and np.isnan(out[1]).all()


@pytest.mark.slow
def test_bench_reports_decisions() -> None:
    datasets = pytest.importorskip("scio.datasets")
    pytest.importorskip("skimage", reason="scikit-image provides textures/photos")
    try:
        datasets.fashion_mnist_dir()
        datasets.mnist(n=1)
        datasets.animal_mnist(n=1)
    except (datasets.DatasetNotFoundError, datasets.DatasetDependencyError) as exc:
        pytest.skip(f"benchmark data missing: {exc}")
    from scio.bench import run_benchmark
    from scio.bench.runner import _markdown

    console = Console(file=io.StringIO(), width=300)
    result = run_benchmark(
        "far", scores=["Softmax", "Energy"], n_calib=200, n_test=400, batch_size=200,
        show_progress=False, console=console,
    )  # fmt: skip
    assert result.decisions is not None and result.decisions.shape == (2, 7)
    assert bool(((result.decisions >= 0) & (result.decisions <= 1)).all())
    # 200 holdout inputs, 200 InD test inputs: the measured rejection rate is near 5 %
    assert (result.decisions[:, 0] <= 0.15).all()
    assert "InD rej. / OoD det." in console.file.getvalue()  # type: ignore[attr-defined]
    text = _markdown(result, "scio bench")
    assert "guaranteed 5% false-alarm rate" in text and "| Softmax |" in text
    rows = [row for row in result.rows() if row["metric"] == "DR@5%FA"]
    assert len(rows) == 2 * 6
