"""Visualizing & Evaluating OoD Detection algorithms (scio's second tutorial, offline).

Compares four confidence scores of the CIFAR-10 tutorial model ("Tiniest") on
in-distribution-ish inputs and three OoD transformations of them, with histograms, ROC
curves and a table of metrics.

Offline data: CIFAR-10 is not available here, so the "in-distribution" inputs are random
32×32 crops of the natural photos bundled with scikit-image (``pip install scikit-image``),
downscaled to CIFAR-like content. They are natural images but not CIFAR-10 classes, so the
numbers only illustrate the workflow. The OoD sets are those of the original tutorial:
vertically flipped, darker and uniformly random images.

Run::

    python examples/visualizing_and_evaluating.py            # shows the figures
    python examples/visualizing_and_evaluating.py out_dir    # saves them, no window
    SCIO_EXAMPLE_SAVE=out_dir python examples/visualizing_and_evaluating.py

Sizes are small so that it runs in about half a minute on 2 idle CPU cores; raise them
(``SCIO_EXAMPLE_N_CALIB``, ``SCIO_EXAMPLE_N_TEST``) for meaningful numbers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

SAVE_DIR = os.environ.get("SCIO_EXAMPLE_SAVE") or (sys.argv[1] if len(sys.argv) > 1 else None)
if SAVE_DIR is not None:
    matplotlib.use("Agg")  # headless: save the figures instead of showing them

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from scio.eval import (
    AUC,
    FPR,
    TPR,
    compute_confidence,
    compute_metrics,
    fit_scores,
    summary,
    summary_plot,
    summary_table,
)
from scio.models import tiniest
from scio.recorder import Recorder
from scio.scores import KNN, GradNorm, Gram, Softmax

N_CALIB = int(os.environ.get("SCIO_EXAMPLE_N_CALIB", "200"))  # calibration samples
N_TEST = int(os.environ.get("SCIO_EXAMPLE_N_TEST", "100"))  # InD inputs; as many per OoD set
SHOW = SAVE_DIR is None


def photo_crops(n: int, *, seed: int) -> torch.Tensor:
    """``n`` random 32×32 RGB crops in [0, 1] of scikit-image's bundled photos."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(n):
        photo = torch.from_numpy(photos[i % len(photos)]).permute(2, 0, 1).float() / 255
        photo = F.interpolate(photo[None], scale_factor=0.25, mode="area")[0]
        top = int(torch.randint(photo.shape[1] - 31, (1,), generator=gen))
        left = int(torch.randint(photo.shape[2] - 31, (1,), generator=gen))
        crops.append(photo[:, top : top + 32, left : left + 32])
    return torch.stack(crops)


def save_or_show(fig: plt.Figure, name: str) -> None:
    if SAVE_DIR is not None:
        Path(SAVE_DIR).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(SAVE_DIR) / name)
        print(f"saved {Path(SAVE_DIR) / name}")
    plt.close(fig)


# 1. Calibration data and the trained network. Natural photos have no CIFAR-10 label: the
#    network's predictions serve as calibration labels (for the scores that use labels).
torch.manual_seed(0)
net = tiniest().eval()
calib_data = photo_crops(N_CALIB, seed=0)
with torch.no_grad():
    calib_labels = net(calib_data).argmax(1)

# 2. Which layers? The recorder lists them with their (depth, index) identifiers.
print(Recorder(net, input_data=calib_data[[0]]))
BLOCK3 = (1, 5)
FEATURE_MAPS = (1, 11)
LOGITS = (1, 12)

# 3. Scores and the layers each one records.
scores_and_layers = (
    (Softmax(), []),
    (GradNorm(), [LOGITS]),
    (Gram(), [BLOCK3, FEATURE_MAPS, LOGITS]),
    (KNN(k=int(len(calib_data) ** 0.4)), [FEATURE_MAPS]),
)

# 4. Calibrate every score: one forward pass over the calibration data serves all of them.
scores_fit = fit_scores(scores_and_layers, net, calib_data, calib_labels)

# 5. Test data: in-distribution, and three kinds of OoD inputs.
ind = photo_crops(N_TEST, seed=1)
oods = (ind.flip(2), ind * 0.5, torch.rand_like(ind))
oods_title = ("Vertical flip", "Darker", "Uniformly random")

# 6. Confidence of every score on every input (batched forward passes).
confs_ind, confs_oods = compute_confidence(
    scores_fit, ind=ind, oods=oods, oods_title=oods_title, batch_size=100
)

# 7. Visualize: one histogram of confidences per score, one ROC panel per OoD set.
plt.rcParams["figure.figsize"] = (15, 9)
fig = summary_plot(
    confs_ind,
    confs_oods,
    scores_and_layers=scores_and_layers,
    oods_title=oods_title,
    show=SHOW,
)
save_or_show(fig, "summary_plot.png")

# 8. Evaluate: partial AUC up to 20 % FPR and TPR at 5 % FPR (OoD = positives), in a table.
#    Gold: best of a column; bold: better than the baseline (or all, without baseline).
metrics = (AUC(max_fpr=0.2), TPR(max_fpr=0.05))
evals = compute_metrics(confs_ind, confs_oods, metrics)
summary_table(evals, scores_and_layers=scores_and_layers, oods_title=oods_title, metrics=metrics)

# 9. `summary` does both at once. Here with Softmax as the baseline, the usual AUROC and
#    FPR@95 (fraction of OoD accepted when 95 % of InD is kept: lower is better), and only
#    the scores that are best somewhere, with their ROC convex hulls.
fig = summary(
    confs_ind,
    confs_oods,
    scores_and_layers=scores_and_layers,
    oods_title=oods_title,
    metrics=(AUC(), FPR(tpr=0.95)),
    baseline=0,
    optimal_only=True,
    convex_hull=True,
    show=SHOW,
)
save_or_show(fig, "summary.png")

# 10. How long did each score take to calibrate and infer?
for score in scores_fit:
    score.timer.report
    print("----")
