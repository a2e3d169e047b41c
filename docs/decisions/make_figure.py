"""Numbers and figure of docs/decisions.md: conformal decisions on the bench model.

Run from the repository root: ``.venv/bin/python docs/decisions/make_figure.py``. It scores
the Fashion-MNIST test set (10,000 inputs the model never saw) and two OoD sets once, then
draws 50 random holdout / test splits of the InD set, and writes
``docs/decisions/false_alarm.png`` and the markdown tables printed on stdout.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from scio import datasets
from scio.decision import ConformalDetector
from scio.decision import pvalues as P
from scio.eval import ROC
from scio.models import fmnist
from scio.recorder import Recorder
from scio.scores import Energy, Softmax

N_SPLITS = 50
ALPHAS = np.array([0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2])
SIZES = (50, 500, 2000)
OUT = Path(__file__).with_name("false_alarm.png")


def conformities() -> tuple[list[str], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    net = fmnist()
    calib = datasets.fashion_mnist("calibration", n=64).data  # Softmax / Energy keep no state
    scores = [Softmax(), Energy()]
    for score in scores:
        score.fit(Recorder(net, input_data=calib[:1]), calib)
    det = ConformalDetector(scores)

    def run(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [det.scored(batch) for batch in data.split(1000)]
        return torch.cat([c for c, _ in parts], 1).double(), torch.cat([k for _, k in parts])

    ind, classes = run(datasets.fashion_mnist("test").data)
    oods = {
        "MNIST": run(datasets.mnist().data)[0],
        "Animal-MNIST": run(datasets.animal_mnist(n=5000).data)[0],
    }
    return ["Softmax", "Energy"], ind, classes, oods


def main() -> None:
    names, ind, classes, oods = conformities()
    n_pool = ind.shape[1]
    gen = torch.Generator().manual_seed(0)
    splits = [torch.randperm(n_pool, generator=gen) for _ in range(N_SPLITS)]

    # false-alarm rate vs alpha, for several holdout sizes (score: Energy)
    k = names.index("Energy")
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=130)
    ax.plot([0, 0.2], [0, 0.2], color="black", lw=1, ls=":", label="α (the guarantee)")
    ax.plot([], [], color="gray", lw=0.8, label="⌊α(n+1)⌋/(n+1): exact rate, no ties")
    dense = np.linspace(0.001, 0.2, 2000)
    for shift, n, color in zip(
        (-0.002, 0.0, 0.002), SIZES, ("tab:orange", "tab:green", "tab:blue")
    ):
        rates = np.empty((N_SPLITS, len(ALPHAS)))
        for s, perm in enumerate(splits):
            p = P.conformal_p_values(ind[k, perm[:n]], ind[k, perm[n:]])
            rates[s] = [(p <= a).double().mean().item() for a in ALPHAS]
        mean, se = rates.mean(0), rates.std(0, ddof=1) / math.sqrt(N_SPLITS)
        ax.errorbar(ALPHAS + shift, mean, yerr=3 * se, fmt="o", ms=4, color=color, capsize=3,
                    label=f"measured, n = {n} holdout (±3 SE)")  # fmt: skip
        exact = np.floor(dense * (n + 1) + 1e-9) / (n + 1)  # expected rate, continuous scores
        ax.plot(dense, exact, color=color, lw=0.8, alpha=0.7)
    ax.set_xlabel("α (requested false-alarm rate)")
    ax.set_ylabel("in-distribution inputs rejected")
    ax.set_title(
        "Conformal decisions, Energy on scio.models.fmnist\n"
        f"Fashion-MNIST test, {N_SPLITS} random holdout/test splits",
        fontsize=10,
    )
    ax.set_xlim(0, 0.21)
    ax.set_ylim(0, 0.21)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(OUT)
    print(f"wrote {OUT}")

    # numbers: holdout n = 2000, test = the other 8000
    n = 2000
    print("\n| score | α | mean InD rejected | SE | α + 3 SE |")
    print("|---|---:|---:|---:|---:|")
    detection: dict[tuple[str, str], list[float]] = {}
    for k, name in enumerate(names):
        for alpha in (0.05, 0.01):
            r = [
                (P.conformal_p_values(ind[k, perm[:n]], ind[k, perm[n:]]) <= alpha)
                .double()
                .mean()
                .item()
                for perm in splits
            ]
            mean, se = float(np.mean(r)), float(np.std(r, ddof=1) / math.sqrt(N_SPLITS))
            print(f"| {name} | {alpha} | {mean:.4f} | {se:.4f} | {alpha + 3 * se:.4f} |")
        for ood_name, ood in oods.items():
            detection[(name, ood_name)] = [
                (P.conformal_p_values(ind[k, perm[:n]], ood[k]) <= 0.05).double().mean().item()
                for perm in splits
            ]
    print("\n| score | OoD | mean detected at α = 0.05 | SE | ROC TPR at FPR 0.05 |")
    print("|---|---|---:|---:|---:|")
    for (name, ood_name), d in detection.items():
        k = names.index(name)
        ood = oods[ood_name][k].numpy()
        labels = np.r_[np.zeros(n_pool, bool), np.ones(len(ood), bool)]
        roc = ROC(labels, np.r_[ind[k].numpy(), ood])
        tpr = float(roc.TPR[roc.FPR <= 0.05].max())
        se = float(np.std(d, ddof=1) / math.sqrt(N_SPLITS))
        print(f"| {name} | {ood_name} | {np.mean(d):.4f} | {se:.4f} | {tpr:.4f} |")

    # class-conditional: per predicted class, marginal vs class-conditional rejection
    k = names.index("Energy")
    per_marg, per_cond = np.zeros((N_SPLITS, 10)), np.zeros((N_SPLITS, 10))
    for s, perm in enumerate(splits):
        h, t = perm[:n], perm[n:]
        marg = P.conformal_p_values(ind[k, h], ind[k, t]) <= 0.05
        cond = (
            P.conformal_p_values(
                ind[k, h], ind[k, t], holdout_groups=classes[h], test_groups=classes[t], n_groups=10
            )
            <= 0.05
        )
        tc = classes[t]
        counts = torch.bincount(tc, minlength=10).double()
        per_marg[s] = (torch.bincount(tc, weights=marg.double(), minlength=10) / counts).numpy()
        per_cond[s] = (torch.bincount(tc, weights=cond.double(), minlength=10) / counts).numpy()
    print("\nEnergy, α = 0.05, per predicted class (mean over splits):")
    print("| | " + " | ".join(str(c) for c in range(10)) + " |")
    print("|---|" + "---:|" * 10)
    print("| marginal | " + " | ".join(f"{v:.3f}" for v in per_marg.mean(0)) + " |")
    print("| class-conditional | " + " | ".join(f"{v:.3f}" for v in per_cond.mean(0)) + " |")


if __name__ == "__main__":
    main()
