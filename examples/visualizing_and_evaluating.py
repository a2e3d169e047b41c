"""Visualizing & Evaluating OoD Detection algorithms: the reference tutorial, offline.

The statements below are the tutorial's, unchanged, except those that load the model and
the data: the trained Tiniest CIFAR-10 network ships with scio, and CIFAR-10 is not
available offline, so the calibration and in-distribution sets are random 32×32 crops of
the natural photos bundled with scikit-image (``pip install scikit-image``). Their labels
are the network's own predictions. The numbers therefore illustrate the workflow only.

Run it in a notebook (or ``scio``'s tests) to display the bare expressions; with plain
``python`` only the tables and timer reports print, and ``summary_plot`` opens a window
(``MPLBACKEND=Agg`` for none).
"""

# %%
# The model and the data (the only lines that differ from the tutorial's).
import torch
import torch.nn.functional as F

from scio.models import tiniest


def photo_crops(n: int, *, seed: int) -> torch.Tensor:
    """``n`` random 32×32 RGB crops in [0, 1] of scikit-image's bundled photos, reduced 4×."""
    from skimage import data

    names = ("astronaut", "chelsea", "coffee", "rocket")
    photos = [torch.from_numpy(getattr(data, name)()).permute(2, 0, 1) / 255 for name in names]
    photos = [F.interpolate(p[None].float(), scale_factor=0.25, mode="area")[0] for p in photos]
    gen = torch.Generator().manual_seed(seed)
    which = torch.randint(len(photos), (n,), generator=gen).tolist()
    crops = []
    for k in which:
        photo = photos[k]
        top = int(torch.randint(photo.shape[1] - 31, (1,), generator=gen))
        left = int(torch.randint(photo.shape[2] - 31, (1,), generator=gen))
        crops.append(photo[:, top : top + 32, left : left + 32])
    return torch.stack(crops)


torch.manual_seed(0)
calib_data = photo_crops(1000, seed=0)
net = tiniest()
with torch.no_grad():
    calib_labels = net(calib_data).argmax(1)

sample_shape = calib_data.shape[1:]
net = net.to(calib_data)

# %%
# 1. The algorithms to compare, and the layers each one analyses.
from scio.recorder import Recorder

Recorder(net, input_data=calib_data[[0]])  # Visualize layers

# %%

BLOCK3 = (1, 5)
FEATURE_MAPS = (1, 11)
LOGITS = (1, 12)

# %%
from scio.scores import GradNorm, Gram, KNN, Softmax  # noqa: I001 (the tutorial's order)

scores_and_layers = (
    (Softmax(), []),
    (GradNorm(), [LOGITS]),
    (Gram(), [BLOCK3, FEATURE_MAPS, LOGITS]),
    (KNN(k=int(len(calib_data) ** 0.4)), [FEATURE_MAPS]),
)

# %%
# 2. Calibrate every score.
from scio.eval import fit_scores

scores_fit = fit_scores(scores_and_layers, net, calib_data, calib_labels)

# %%
# 3. In-distribution inputs (other crops) and three OoD transformations of them.
ind = photo_crops(1000, seed=1)

# %%
oods_title = ("Vertical flip", "Darker", "Uniformly random")
oods = (ind.flip(2), ind * 0.5, torch.rand_like(ind))

# %%
# 4. Confidence of every score on every input.
from scio.eval import compute_confidence

confs_ind, confs_oods = compute_confidence(
    scores_fit,
    ind=ind,
    oods=oods,
    oods_title=oods_title,
)

# %%
# 5. One histogram of confidences per score, one ROC panel per OoD set.
from matplotlib import rcParams

from scio.eval import summary_plot

rcParams["figure.figsize"] = (15, 9)  # Adjust tutorial layout
summary_plot(
    confs_ind,
    confs_oods,
    scores_and_layers=scores_and_layers,
    oods_title=oods_title,
)

# %%
# 6. Metrics: partial AUC up to 20 % FPR and TPR at 5 % FPR (OoD = positives).
from scio.eval import AUC, TPR, compute_metrics, summary_table

metrics = (AUC(max_fpr=0.2), TPR(max_fpr=0.05))
evals = compute_metrics(confs_ind, confs_oods, metrics)
summary_table(
    evals,
    scores_and_layers=scores_and_layers,
    oods_title=oods_title,
    metrics=metrics,
)

# %%
# 7. `summary(...)` does steps 5 and 6 at once. Profiling:
for score, _ in scores_and_layers:
    score.timer.report  # Report execution times
    print("----")
