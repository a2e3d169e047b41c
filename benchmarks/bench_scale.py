"""Scale benchmark: calibration time, peak memory and inference time versus the bank size.

Synthetic class-conditional features (10 Gaussian classes) go through a feature-level
network (identity backbone + linear head, so the forward pass is negligible); the scores
record the backbone output. Features are generated batch by batch from seeded generators,
so the data set itself is never held in memory: the peak RSS is what the score keeps.
Each configuration runs in its own subprocess (peak RSS = ``ru_maxrss`` of that process;
``base`` = RSS after imports and the network, before calibration).

Usage::

    python benchmarks/bench_scale.py                  # the default grid, markdown table
    python benchmarks/bench_scale.py --quick          # n = 10k and 100k only
    python benchmarks/bench_scale.py --json out.json  # also save the raw results

Inference is timed on ``q = min(10k, 2e11 / (n·d))`` queries (at least 500; exact KNN on a
1M bank would otherwise dominate the run) and reported per 10k queries (scaled linearly,
which holds for these batched matrix products); the measured ``q`` is in the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

BATCH = 8192
N_CLASSES = 10


def _methods() -> dict[str, Callable[[], Any]]:
    from scio import scores

    table: dict[str, Callable[[], Any]] = {
        "KNN exact": lambda: scores.KNN(k=50),
        "KNN α=0.1": lambda: scores.KNN(k=50, bank_fraction=0.1),
        "KNN float16": lambda: scores.KNN(k=50, bank_dtype="float16"),
        "KNN faiss-ivf": lambda: scores.KNN(k=50, index_backend="faiss-ivf"),
        "DeepMahalanobis": scores.DeepMahalanobis,
        "RelativeMahalanobis": scores.RelativeMahalanobis,
        "ReAct": lambda: scores.ReAct(percentile=90.0),
    }
    if hasattr(scores, "ViM"):
        table["ViM"] = scores.ViM
    if hasattr(scores, "NNGuide"):
        table["NNGuide"] = lambda: scores.NNGuide(k=10, bank_fraction=0.1)
    return table


class FeatureNet(nn.Module):
    """Identity backbone + linear head: the inputs are the features."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.backbone = nn.Identity()
        self.head = nn.Linear(d, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _batches(n: int, d: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    centres = torch.randn(N_CLASSES, d, generator=torch.Generator().manual_seed(0))
    for i, start in enumerate(range(0, n, BATCH)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        size = min(BATCH, n - start)
        labels = torch.randint(0, N_CLASSES, (size,), generator=generator)
        yield centres[labels] + 2 * torch.randn(size, d, generator=generator), labels


class _Stream:
    """Re-iterable, sized stream of batches (``fit`` learns ``n`` from ``dataset``)."""

    def __init__(self, n: int, d: int, seed: int) -> None:
        self.n, self.d, self.seed = n, d, seed
        self.dataset = range(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _batches(self.n, self.d, self.seed)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(method: str, n: int, d: int) -> dict[str, Any]:
    """Fit ``method`` on ``n`` synthetic ``d``-dimensional features, in this process."""
    from scio.recorder import Recorder

    torch.manual_seed(0)
    net = FeatureNet(d).eval()
    rnet = Recorder(net, input_size=(1, d))
    rnet.record("backbone")
    factory = _methods()[method]  # imports every score first: ``base`` includes them
    base = _rss_mib()
    score = factory()
    start = time.perf_counter()
    score.fit(rnet, _Stream(n, d, seed=1))
    fit_s = time.perf_counter() - start
    peak = _rss_mib()
    q = int(min(10_000, max(500, 2e11 / (n * d))))
    queries = next(_batches(q, d, seed=2))[0]
    score(queries[:10])  # warm-up
    start = time.perf_counter()
    score(queries)
    infer_s = (time.perf_counter() - start) * 10_000 / q
    recall = ""
    if getattr(getattr(score, "index", None), "backend", "torch") != "torch":
        from scio.index import recall_at_k
        from scio.scores.utils import Index

        exact = Index(dim=d, metric="l2")
        exact.add(score.index.samples)
        features = queries[:500] / queries[:500].norm(dim=1, keepdim=True)  # act_norm = 2
        recall = f"{recall_at_k(score.index, exact, features, 50):.3f}"
    return {"method": method, "n": n, "d": d, "fit_s": fit_s, "peak_rss_mib": peak,
            "base_rss_mib": base, "infer_s_per_10k": infer_s, "queries": q,
            "recall": recall}  # fmt: skip


def _grid(quick: bool) -> list[tuple[str, int, int]]:
    sizes = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
    grid = [(method, n, 256) for n in sizes for method in _methods()]
    wide = ("KNN α=0.1", "DeepMahalanobis", "ReAct")
    grid += [(method, n, 2048) for n in (10_000, 100_000) for method in wide]
    return grid


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | n | d | fit (s) | peak RSS (MiB) | RSS − base (MiB) | inference (s / 10k) "
        "| q | recall@50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['n']:,} | {r['d']} | {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['n']:,} | {r['d']} | {r['fit_s']:.2f} | {r['peak_rss_mib']:.0f} "
            f"| {r['peak_rss_mib'] - r['base_rss_mib']:.0f} | {r['infer_s_per_10k']:.2f} "
            f"| {r['queries']:,} | {r.get('recall', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 10k and 100k only")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, n, d = args.one
        print(json.dumps(run_one(method, int(n), int(d))))
        return
    rows = []
    for method, n, d in _grid(args.quick):
        command = [sys.executable, __file__, "--one", method, str(n), str(d)]
        try:
            for _ in range(2):  # one retry: a failed run is rerun once before being reported
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=args.timeout, check=False
                )
                if done.returncode == 0:
                    break
            if done.returncode == 0:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                error = (done.stderr.strip().splitlines() or ["failed"])[-1][:80]
                rows.append({"method": method, "n": n, "d": d, "error": error})
        except subprocess.TimeoutExpired:
            rows.append({"method": method, "n": n, "d": d, "error": f"> {args.timeout:.0f} s"})
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
