"""Search time of ``scio.scores.utils.Index``: torch backend vs faiss flat index.

Prints a markdown table: 2k queries against 10k and 50k references of dimension 80, both
metrics, float32 on CPU (and on CUDA when available, torch backend only since faiss-cpu cannot
run there). faiss columns are omitted when faiss is not installed.

Usage: ``python benchmarks/bench_index.py [--repeat 5] [--k 10]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scio.scores.utils import Index

try:
    import faiss  # noqa: F401

    HAS_FAISS = True
except ImportError:
    HAS_FAISS = False


def _time_searches(indexes: list[Index], queries: torch.Tensor, k: int, repeat: int) -> list[float]:
    """Median wall time of ``index.search`` in milliseconds for each index.

    One warm-up call each, then the indexes are timed in turn (interleaved), so that a busy
    machine penalises them alike.
    """
    cuda = queries.is_cuda
    times: list[list[float]] = [[] for _ in indexes]
    for index in indexes:
        index.search(queries, k)
    for _ in range(repeat):
        for index, index_times in zip(indexes, times):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            index.search(queries, k)
            if cuda:
                torch.cuda.synchronize()
            index_times.append(time.perf_counter() - start)
    return [1e3 * statistics.median(index_times) for index_times in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=80)
    parser.add_argument("--refs", type=int, nargs="+", default=[10_000, 50_000])
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(args.queries, args.dim, generator=generator)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    header = ["device", "references", "metric", "k", "torch (ms)"]
    if HAS_FAISS:
        header += ["faiss flat (ms)", "faiss / torch", "same I", "max |ΔD|"]
    print(
        f"{args.queries} queries × dim {args.dim}, float32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
        + ("" if HAS_FAISS else " (faiss not installed: torch only)")
    )
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for device in devices:
        for n_ref in args.refs:
            refs = torch.randn(n_ref, args.dim, generator=generator)
            for metric in ("l2", "ip"):
                index = Index(dim=args.dim, metric=metric)
                index.add(refs.to(device))
                q = queries.to(device)
                indexes = [index]
                if HAS_FAISS:
                    findex = Index(dim=args.dim, metric=metric, backend="faiss")
                    findex.add(refs)
                    indexes.append(findex)
                timings = _time_searches(indexes, q, args.k, args.repeat)
                row = [device, f"{n_ref:,}", metric, str(args.k), f"{timings[0]:.1f}"]
                if HAS_FAISS:
                    D_t, I_t = index.search(q, args.k)
                    D_f, I_f = findex.search(q, args.k)
                    same = (I_t == I_f).double().mean().item()
                    diff = (D_t - D_f).abs().max().item()
                    ratio = timings[1] / timings[0]
                    row += [f"{timings[1]:.1f}", f"{ratio:.2f}", f"{same:.2%}", f"{diff:.1e}"]
                print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
