"""The guarantee on real data: the bench model on Fashion-MNIST, 50 random holdout splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("scio.datasets")
try:
    datasets.fashion_mnist_dir()
    datasets.mnist(n=1)
except (datasets.DatasetNotFoundError, datasets.DatasetDependencyError) as exc:
    pytest.skip(f"real data missing: {exc}", allow_module_level=True)

from scio.decision import ConformalDetector  # noqa: E402
from scio.decision import pvalues as P  # noqa: E402
from scio.eval import ROC  # noqa: E402
from scio.models import fmnist  # noqa: E402
from scio.recorder import Recorder  # noqa: E402
from scio.scores import Energy, Softmax  # noqa: E402

N_POOL, N_OOD, N_HOLDOUT, N_SPLITS = 4000, 2000, 1000, 50


@pytest.fixture(scope="module")
def setup() -> tuple[ConformalDetector, torch.Tensor, torch.Tensor, torch.Tensor]:
    net = fmnist()
    calib = datasets.fashion_mnist("calibration", n=64, seed=0).data  # Softmax/Energy: no state
    scores = [
        Softmax().fit(Recorder(net, input_data=calib[:1]), calib),
        Energy().fit(Recorder(net, input_data=calib[:1]), calib),
    ]
    det = ConformalDetector(scores)
    pool = datasets.fashion_mnist("test", n=N_POOL, seed=1).data  # unseen in training
    ood = datasets.mnist(n=N_OOD, seed=1).data
    conf_ind = torch.cat([det.scored(b)[0] for b in pool.split(500)], dim=1).double()
    conf_ood = torch.cat([det.scored(b)[0] for b in ood.split(500)], dim=1).double()
    return det, pool, conf_ind, conf_ood


@pytest.mark.slow
def test_false_alarm_rate_and_detection_over_random_splits(
    setup: tuple[ConformalDetector, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    _, _, conf_ind, conf_ood = setup
    generator = torch.Generator().manual_seed(0)
    for k in range(conf_ind.shape[0]):  # Softmax, Energy
        rejected: dict[float, list[float]] = {0.05: [], 0.01: []}
        detected = []
        for _ in range(N_SPLITS):
            perm = torch.randperm(N_POOL, generator=generator)
            holdout, test = conf_ind[k, perm[:N_HOLDOUT]], conf_ind[k, perm[N_HOLDOUT:]]
            prepared = P.sorted_holdout(holdout)
            p_test = P.conformal_p_values(prepared, test)
            for alpha, rates in rejected.items():
                rates.append(float((p_test <= alpha).double().mean()))
            detected.append(
                float((P.conformal_p_values(prepared, conf_ood[k]) <= 0.05).double().mean())
            )
        for alpha, rates in rejected.items():
            mean, se = np.mean(rates), np.std(rates, ddof=1) / math.sqrt(N_SPLITS)
            assert mean <= alpha + 3 * se, (k, alpha, mean, se)
            assert mean >= alpha / 2, (k, alpha, mean)  # not vacuous: close to alpha
        labels = np.r_[np.zeros(N_POOL, bool), np.ones(N_OOD, bool)]
        roc = ROC(labels, np.r_[conf_ind[k].numpy(), conf_ood[k].numpy()])
        tpr = float(roc.TPR[roc.FPR <= 0.05].max())
        mean, se = np.mean(detected), np.std(detected, ddof=1) / math.sqrt(N_SPLITS)
        assert abs(mean - tpr) <= 3 * se + 1 / N_OOD, (k, mean, tpr, se)


@pytest.mark.slow
def test_detector_on_real_inputs_matches_precomputed_conformities(
    setup: tuple[ConformalDetector, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    det, pool, conf_ind, _ = setup
    det.fit(pool[:N_HOLDOUT], batch_size=500)
    torch.testing.assert_close(det.holdout_conformities_.double(), conf_ind[:, :N_HOLDOUT])
    test = pool[N_HOLDOUT : N_HOLDOUT + 500]
    reference = P.combine_p_values(
        P.conformal_p_values(conf_ind[:, :N_HOLDOUT], conf_ind[:, N_HOLDOUT : N_HOLDOUT + 500])
    )
    assert torch.equal(det.p_values(test), reference)
