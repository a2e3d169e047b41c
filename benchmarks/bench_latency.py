"""Serving latency: the fixed cost a score adds to one forward at batch size 1.

    python benchmarks/bench_latency.py            # median of 2,000 calls per row, µs

The network is deliberately tiny (a 4 -> 3 linear layer, or the tutorial model with
``--tiniest``) so that the table shows the per-call overhead of scio itself: validation,
recording, timer and index set-up. Overhead = score call - plain forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _median_us(func: Callable[[], Any], n: int) -> float:
    for _ in range(min(200, n)):
        func()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        func()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    from scio import scores
    from scio.models import tiniest
    from scio.recorder import Recorder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--tiniest", action="store_true", help="the tutorial model instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if args.tiniest:
        net: nn.Module = tiniest()
        calib = torch.rand(64, 3, 32, 32)
        layer: Any = (1, 11)
    else:
        net = nn.Sequential(nn.Linear(4, 3)).eval()
        calib = torch.randn(64, 4)
        layer = (1, 1)
    x = calib[:1].clone()
    with torch.no_grad():
        labels = net(calib).argmax(1)
    plain = _median_us(lambda: net(x), args.calls)

    def plain_no_grad() -> None:
        with torch.no_grad():
            net(x)

    plain_ng = _median_us(plain_no_grad, args.calls)
    rows = [("plain forward", plain), ("plain forward (no_grad)", plain_ng)]
    configs: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("Softmax", scores.Softmax(), ()),
        ("Energy", scores.Energy(), ()),
        ("KNN (k=5, 64-sample bank)", scores.KNN(k=5), (layer,)),
        ("DeepMahalanobis", scores.DeepMahalanobis(), (layer,)),
    ]
    for name, score, layers in configs:
        rnet = Recorder(net, input_data=calib[:1])
        rnet.record(*layers)
        score.fit(rnet, calib, labels)
        rows.append((name, _median_us(lambda score=score: score(x), args.calls)))
        score.reset_timer()
    print(
        f"{'model':>10}: {'tiniest' if args.tiniest else 'Linear(4, 3)'}, batch 1, "
        f"1 thread, median of {args.calls} calls, torch {torch.__version__}\n"
    )
    print("| call | latency (µs) | overhead vs plain forward (µs) |")
    print("|---|---:|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} | {us - plain:+.1f} |")


if __name__ == "__main__":
    main()
