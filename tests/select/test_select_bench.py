"""`scio bench --tune`: the sweeps, disjoint validation data, a reduced run end to end."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
import torch

from scio.bench.runner import SCORE_FACTORIES
from scio.bench.tuning import NOT_SWEPT, OPENOOD_SWEEPS
from scio.select import expand_grid, make_candidates


@pytest.mark.parametrize("name", sorted(OPENOOD_SWEEPS))
def test_every_sweep_is_a_valid_grid_of_its_bench_method(name: str) -> None:
    assert name in SCORE_FACTORIES, f"{name} is not a bench method"
    source, grid, _ = OPENOOD_SWEEPS[name]
    assert source.endswith(".yml")
    factory = SCORE_FACTORIES[name][0]
    candidates = make_candidates(factory(), expand_grid(grid))  # names and values accepted
    assert len(candidates) == len(expand_grid(grid)) >= 1
    assert name not in NOT_SWEPT


# -- real data: validation slices disjoint from calibration and test --------------------------
def _datasets():
    datasets = pytest.importorskip("scio.datasets")
    pytest.importorskip("skimage", reason="scikit-image provides the validation OoD images")
    try:
        datasets.fashion_mnist_dir()
        datasets.mnist(n=1)
        datasets.animal_mnist(n=1)
    except (datasets.DatasetNotFoundError, datasets.DatasetDependencyError) as exc:
        pytest.skip(f"benchmark data missing: {exc}")
    return datasets


def _hashes(images: torch.Tensor) -> set[str]:
    """Digests of the exact pixel values of each image."""
    rows = images.reshape(len(images), -1).to(torch.float32).numpy()
    return {hashlib.sha1(row.tobytes()).hexdigest() for row in rows}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["far", "near"])
def test_validation_is_disjoint_from_calibration_and_test(protocol: str) -> None:
    datasets = _datasets()
    from scio.bench.protocols import PROTOCOLS
    from scio.bench.validation import SCENE_NAMES, fmnist_test_indices, validation_data

    n_test, n_val = 2000, 1000  # the defaults of `scio bench --tune`
    proto = PROTOCOLS[protocol](n_calib=5000, n_test=n_test, seed=0)
    val = validation_data(protocol, n_test=n_test, n_val=n_val, seed=0)
    test_idx, val_idx = fmnist_test_indices(protocol, n_test, n_val, seed=0)
    # index level: the validation slice and the test set share no test-file index
    assert len(set(test_idx.tolist())) == n_test and len(set(val_idx.tolist())) == n_val
    assert not set(test_idx.tolist()) & set(val_idx.tolist())
    assert torch.equal(val.ind_indices, val_idx)
    # the indices are those of the loaded images (same rule as the protocol's loader)
    full_test = datasets.fashion_mnist("test")  # file order
    assert torch.equal(proto.ind, full_test.data[test_idx])
    assert torch.equal(val.ind, full_test.data[val_idx])
    # calibration comes from the training file's held-out part, never from the test file
    calib_idx = datasets.fashion_mnist_calibration_split()[1]
    train = datasets.fashion_mnist("train").data
    calib_rows = {row.numpy().tobytes() for row in train[calib_idx]}
    assert all(row.numpy().tobytes() in calib_rows for row in proto.calib_data[:200])
    # validation OoD: none of the test OoD sets (no shared image, other sources)
    assert len(val.ood) == n_val
    test_ood = set().union(*(_hashes(ood) for ood in proto.oods))
    assert not _hashes(val.ood) & test_ood
    assert not set(SCENE_NAMES) & (set(datasets.PHOTO_NAMES) | set(datasets.TEXTURE_NAMES))


@pytest.mark.slow
def test_bench_tune_end_to_end(tmp_path: Path) -> None:
    _datasets()
    from scio.cli import main

    code = main(
        ["bench", "--tune", "--protocol", "near", "--scores", "Softmax", "KNN", "ReAct",
         "Energy", "--n-calib", "600", "--n-test", "300", "--n-val", "200",
         "--batch-size", "300", "--no-progress", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    report = (tmp_path / "report.md").read_text()
    assert "## near-OoD: tuned on validation data" in report
    assert "chosen on validation" in report and "validated rank average" in report
    assert "LFW subset + grayscale scenes" in report
    with (tmp_path / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"tuned_value", "tuned_params", "val_auroc", "grid_points"} <= set(rows[0])
    auroc = {r["score"]: r for r in rows if r["metric"] == "AUROC"}
    # k=1000 > 600 calibration inputs is dropped from knn.yml's sweep, and said so
    assert auroc["KNN"]["grid_points"] == "4" and auroc["ReAct"]["grid_points"] == "4"
    assert "- KNN: dropped {'k': 1000}" in report
    assert auroc["Softmax"]["tuned_params"] == "default"
    assert auroc["Softmax"]["tuned_value"] == auroc["Softmax"]["value"]  # not tuned: same
    assert any(name.startswith("RankAverage(") for name in auroc)
    assert sum(int(r["validated_choice"]) for r in auroc.values()) == 1
    for row in auroc.values():
        assert 0.0 <= float(row["tuned_value"]) <= 1.0 and 0.5 <= float(row["val_auroc"]) <= 1
