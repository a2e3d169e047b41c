"""Time and peak memory of a full evaluation on the tutorial model.

Default: 4 scores (Softmax, GradNorm, Gram, KNN) × 3 OoD sets × 2,000 inputs each (plus
2,000 InD inputs), fitted on 500 calibration inputs, confidences computed by batches.

    python benchmarks/bench_eval.py [--n 2000] [--n-calib 500] [--batch-size 256]
    python benchmarks/bench_eval.py --unbatched   # one forward per set, for comparison

Prints, for each stage, its wall-clock and CPU time (the CPU time does not depend on other
processes sharing the machine) and its peak resident memory (sampled every 20 ms), then
the process peak (``ru_maxrss``). The input tensors take ``4 · 3 · 32 · 32 · n`` bytes per
set.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import torch
import torch.nn.functional as F


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux: ru_maxrss in KiB)."""
    scale = 1 if sys.platform != "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        return float("nan")


def photo_crops(n: int, *, seed: int) -> torch.Tensor:
    """``n`` random 32×32 crops in [0, 1] of scikit-image's bundled RGB photos."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    scaled = [
        F.interpolate(
            torch.from_numpy(p).permute(2, 0, 1).float()[None] / 255,
            scale_factor=0.25,
            mode="area",
        )[0]
        for p in photos
    ]
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, 32, 32)
    for i in range(n):
        photo = scaled[i % len(scaled)]
        top = int(torch.randint(photo.shape[1] - 31, (1,), generator=gen))
        left = int(torch.randint(photo.shape[2] - 31, (1,), generator=gen))
        out[i] = photo[:, top : top + 32, left : left + 32]
    return out


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RssSampler:
    """Highest resident memory seen by a background thread polling every 20 ms."""

    def __init__(self) -> None:
        self.peak = current_rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, current_rss_mib())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mib())


def stage(name: str, func: Callable[[], Any]) -> Any:
    start, cpu_start, rss_start = time.perf_counter(), cpu_seconds(), current_rss_mib()
    with RssSampler() as sampler:
        result = func()
    duration, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    print(
        f"{name:<34} wall {duration:8.2f} s  cpu {cpu:8.2f} s  RSS before {rss_start:7.1f} MiB"
        f"  stage peak {sampler.peak:7.1f} MiB (+{sampler.peak - rss_start:.1f})",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="inputs per set (InD and each OoD)")
    parser.add_argument("--n-calib", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--unbatched", action="store_true", help="one forward pass per set")
    parser.add_argument("--save", default=None, help="save the summary figure there")
    args = parser.parse_args()

    import matplotlib.pyplot as plt

    from scio.eval import (
        AUC,
        FPR,
        TPR,
        compute_confidence,
        compute_metrics,
        fit_scores,
        summary_plot,
        summary_table,
    )
    from scio.eval.classification.benchmark import ScoreClassifAndLayers
    from scio.models import tiniest
    from scio.scores import KNN, GradNorm, Gram, Softmax

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"peak RSS after imports: {peak_rss_mib():.1f} MiB")
    torch.manual_seed(0)
    net = tiniest().eval()
    calib = photo_crops(args.n_calib, seed=0)
    with torch.no_grad():
        calib_labels = net(calib).argmax(1)
    ind = photo_crops(args.n, seed=1)
    oods = (ind.flip(2), ind * 0.5, torch.rand_like(ind))
    titles = ("Vertical flip", "Darker", "Uniformly random")
    n_bytes = sum(t.numel() * t.element_size() for t in (ind, *oods))
    print(f"test inputs: 4 sets × {args.n} = {n_bytes / 2**20:.1f} MiB")

    pairs: tuple[ScoreClassifAndLayers, ...] = (
        (Softmax(), []),
        (GradNorm(), [(1, 12)]),
        (Gram(), [(1, 5), (1, 11), (1, 12)]),
        (KNN(k=int(args.n_calib**0.4)), [(1, 11)]),
    )
    scores = stage(
        "fit_scores (joint pass)",
        lambda: fit_scores(pairs, net, calib, calib_labels, batch_size=args.batch_size),
    )
    batch_size = None if args.unbatched else args.batch_size
    confs_ind, confs_oods = stage(
        f"compute_confidence (bs={batch_size})",
        lambda: compute_confidence(
            scores, ind=ind, oods=oods, oods_title=titles, batch_size=batch_size
        ),
    )
    metrics = (AUC(), AUC(max_fpr=0.2), TPR(max_fpr=0.05), FPR())
    evals = stage("compute_metrics", lambda: compute_metrics(confs_ind, confs_oods, metrics))
    stage(
        "summary_table",
        lambda: summary_table(
            evals, scores_and_layers=pairs, oods_title=titles, metrics=metrics, baseline=0
        ),
    )
    plt.rcParams["figure.figsize"] = (15, 9)
    fig = stage(
        "summary_plot",
        lambda: summary_plot(
            confs_ind,
            confs_oods,
            scores_and_layers=pairs,
            oods_title=titles,
            show=False,
            save=args.save,
        ),
    )
    plt.close(fig)
    assert np.isfinite(evals).all()
    print(f"peak RSS overall: {peak_rss_mib():.1f} MiB")


if __name__ == "__main__":
    main()
