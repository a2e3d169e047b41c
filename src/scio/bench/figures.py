"""Benchmark figure: AUROC heat map (scores × OoD sets) and cost per score."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from scio.bench.result import BenchResult

__all__ = ["summary_figure"]


def summary_figure(result: BenchResult, path: str | Path) -> Path:
    """Save a two-panel PNG: AUROC per score and OoD set (annotated heat map, scores sorted
    by mean AUROC) and inference overhead relative to a plain forward pass."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    aurocs = result.evals[:, :, 0]
    order = np.argsort(-np.nanmean(aurocs, axis=1), kind="stable")
    names = [result.names[i] for i in order]
    values = aurocs[order]
    overheads = np.array([result.overhead(i) for i in order])
    n_scores, n_oods = values.shape
    width = 4.0 + 1.25 * n_oods + 3.5
    height = 1.2 + 0.38 * n_scores
    fig, (ax_map, ax_cost) = plt.subplots(
        1, 2, figsize=(width, height), gridspec_kw={"width_ratios": [1.25 * n_oods + 1.2, 3.2]}
    )
    image = ax_map.imshow(values, cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
    ax_map.set_xticks(range(n_oods), [t.replace(" (", "\n(") for t in result.oods_title])
    ax_map.set_yticks(range(n_scores), names)
    ax_map.tick_params(axis="x", labelrotation=0, labelsize=8)
    for i in range(n_scores):
        for j in range(n_oods):
            value = values[i, j]
            ax_map.text(
                j, i, "nan" if np.isnan(value) else f"{value:.3f}",
                ha="center", va="center", fontsize=8,
                color="black" if 0.6 < value < 0.95 or np.isnan(value) else "white",
            )  # fmt: skip
    ax_map.set_title(f"AUROC ({result.protocol}-OoD; higher is better)")
    fig.colorbar(image, ax=ax_map, fraction=0.04, pad=0.02)

    positions = np.arange(n_scores)
    ax_cost.barh(positions, overheads, color="tab:blue")
    ax_cost.set_yticks(positions, [])
    ax_cost.set_ylim(ax_map.get_ylim())
    ax_cost.axvline(1.0, color="black", lw=0.8, ls="--")
    ax_cost.set_xscale("log")
    ax_cost.set_xlabel("inference time / plain forward (log)")
    ax_cost.set_title("Overhead")
    for y, value in zip(positions, overheads, strict=True):
        ax_cost.text(value, y, f" {value:.1f}×", va="center", fontsize=8)
    ax_cost.set_xlim(right=max(overheads.max() * 4, 2.0) if n_scores else 2.0)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
