"""Calibrate scores on many processes with torch.distributed (one shard per rank).

Run on CPU (gloo) or GPUs (NCCL, one process per GPU)::

    torchrun --standalone --nproc-per-node=2 examples/distributed_calibration.py

Every rank streams its own contiguous shard of the calibration set (uneven sizes are fine;
``DistributedSampler`` would pad the last shard with duplicates, so it is not used here) and
``fit_jointly(..., distributed=True)`` merges the calibration states: every rank ends with
the scores a single process would fit on the whole set. Rank 0 checks that against a
single-process fit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from scio.recorder import Recorder
from scio.scores import KNN, DeepMahalanobis, ReAct, fit_jointly


def make_net() -> nn.Module:
    torch.manual_seed(0)  # same weights on every rank
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
    ).eval()


def make_data(n: int = 1001) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 4, (n,), generator=generator)
    )


def make_scores() -> list[tuple[object, tuple[str, ...]]]:
    return [(KNN(k=5), ("3",)), (DeepMahalanobis(), ("3",)), (ReAct(percentile=90.0), ("3",))]


def main() -> None:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    cuda = torch.cuda.is_available()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    net, data = make_net().to(device), make_data()
    shard = Subset(data, range(rank * len(data) // world, (rank + 1) * len(data) // world))
    loader = ((x.to(device), y.to(device)) for x, y in DataLoader(shard, batch_size=128))
    scores = make_scores()
    fit_jointly(scores, net, loader, distributed=True)  # type: ignore[arg-type]
    print(f"rank {rank}: {len(shard)} samples, fitted on {scores[0][0]._fit_n_samples}")

    if rank == 0:  # the same scores fitted by one process on the whole set
        queries = torch.randn(64, 1, 8, 8, device=device)
        x, y = data.tensors
        for score, layers in scores:
            single = type(score)(**score.params)  # type: ignore[operator]
            rnet = Recorder(net, input_data=x[:1].to(device))
            rnet.record(*layers)
            single.fit(rnet, x.to(device), y.to(device))
            same = torch.allclose(score(queries)[1], single(queries)[1], rtol=1e-4, atol=1e-5)  # type: ignore[operator]
            print(f"{type(score).__name__}: distributed fit equals single-process fit: {same}")
            assert same
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
