"""Serving throughput: one fitted score shared by 1, 4 and 8 threads, next to the plain model.

    python benchmarks/bench_serving.py            # tutorial model, batch 1 and 64
    python benchmarks/bench_serving.py --seconds 2 --threads 1 4 8 --batches 1 64

Each thread calls the *same* fitted score instance (or the plain network) in a loop on its
own batch for ``--seconds``; the table gives the inputs scored per second, all threads
together. torch's intra-op pool is set to one thread, so threads run in parallel only where
torch releases the GIL; on this 2-core machine nothing scales past 2. Correctness under
threads is tested in ``tests/test_thread_safety.py``; this only measures.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _throughput(
    call: Callable[[torch.Tensor], Any], batch: torch.Tensor, threads: int, seconds: float
) -> float:
    for _ in range(3):  # warm-up
        call(batch)
    counts = [0] * threads
    stop = threading.Event()
    barrier = threading.Barrier(threads + 1)

    def work(i: int) -> None:
        x = batch.clone()
        barrier.wait()
        while not stop.is_set():
            call(x)
            counts[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    return sum(counts) * len(batch) / elapsed


def main() -> None:
    from scio import scores
    from scio.models import tiniest
    from scio.recorder import Recorder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net: nn.Module = tiniest()
    calib = torch.rand(256, 3, 32, 32)
    with torch.no_grad():
        labels = net(calib).argmax(1)

    def plain(x: torch.Tensor) -> Any:
        with torch.no_grad():
            return net(x)

    calls: list[tuple[str, Callable[[torch.Tensor], Any]]] = [("plain forward", plain)]
    for name, score, layers in (
        ("Softmax", scores.Softmax(), ()),
        ("KNN (k=50, 256-sample bank)", scores.KNN(k=50), ("avgpool",)),
        ("DeepMahalanobis", scores.DeepMahalanobis(), ("avgpool",)),
    ):
        rnet = Recorder(net, input_data=calib[:1])
        rnet.record(*layers)
        score.fit(rnet, calib, labels)
        calls.append((name, score))
    print(
        f"tutorial model (tiniest), torch {torch.__version__}, intra-op threads 1, "
        f"{args.seconds:g} s per cell; inputs scored per second (all threads together)\n"
    )
    header = " | ".join(f"batch {b}, {t} thr" for b in args.batches for t in args.threads)
    print(f"| call | {header} |")
    print("|---|" + "---:|" * (len(args.batches) * len(args.threads)))
    for name, call in calls:
        cells = []
        for b in args.batches:
            batch = torch.rand(b, 3, 32, 32)
            for t in args.threads:
                cells.append(f"{_throughput(call, batch, t, args.seconds):,.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
