#!/usr/bin/env python
"""Train the Fashion-MNIST models shipped in ``scio/models/weights`` (reproducible).

Usage (from the repository root, scio installed, Fashion-MNIST package present)::

    python scripts/train_fmnist.py                  # both models at once, 1 thread each
    python scripts/train_fmnist.py --model fmnist   # one model (--model fmnist_near)

Trains on the ``"fit"`` part of the official training split (indices 0-54,999); the last
5,000 training images (calibration) and the test split are never trained on. The test split
is only used to *report* the final accuracy. ``fmnist`` is trained with mixup (alpha 0.4,
see ``docs/models.md``), ``fmnist_near`` without (``--mixup`` overrides both). Fixed seeds,
deterministic algorithms and a fixed thread count (default 1 per model, so ``--model all``
uses 2 cores):
a rerun on the same machine and software gives bit-identical weights (other CPUs or BLAS
builds may differ in the last bits).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from scio.datasets import fashion_mnist
from scio.models.fmnist import (
    FMNIST_CLASSES,
    FMNIST_NEAR_CLASS_IDS,
    FashionCNN,
    fmnist_near_targets,
)

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "scio" / "models" / "weights"
MIXUP_ALPHA = {"fmnist": 0.4, "fmnist_near": 0.0}
"""Default mixup Beta(alpha, alpha) per model; 0 disables mixup (``fmnist_near`` keeps the
recipe its shipped weights were trained with)."""


def augment(x: Tensor, gen: torch.Generator, shift: int = 2) -> Tensor:
    """Random horizontal flip and random translation by up to ``shift`` pixels (zero fill)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (shift,) * 4)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(net: FashionCNN, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    net.eval()
    preds = torch.cat([net(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return (preds == y).float().mean().item()


def train(
    name: str, epochs: int, batch_size: int, lr: float, seed: int, out: Path, mixup: float = 0.0
) -> None:
    """Train ``name``; ``mixup > 0`` mixes each batch with a shuffled copy of itself.

    Mixup (Zhang et al., ICLR 2018): ``x = lam * x + (1 - lam) * x[perm]`` with one
    ``lam ~ Beta(mixup, mixup)`` per batch and the loss mixed with the same weights. Only
    in-distribution training images and their labels are used (no outlier exposure).
    """
    near = name == "fmnist_near"
    classes = FMNIST_NEAR_CLASS_IDS if near else None
    fit = fashion_mnist("fit", classes=classes)
    test = fashion_mnist("test", classes=classes)
    y_fit, y_test = fit.labels, test.labels
    if near:
        y_fit, y_test = fmnist_near_targets(y_fit), fmnist_near_targets(y_test)
    n_classes = len(FMNIST_NEAR_CLASS_IDS) if near else len(FMNIST_CLASSES)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    beta_rng = np.random.default_rng(seed)  # lam ~ Beta (torch's Beta takes no generator)
    net = FashionCNN(n_classes).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    steps = epochs * (len(y_fit) // batch_size)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    print(
        f"[{name}] {len(y_fit)} fit images, {n_classes} classes, {epochs} epochs, "
        f"mixup alpha {mixup:g}",
        flush=True,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(y_fit), generator=gen)
        total = 0.0
        for i in range(len(y_fit) // batch_size):  # drop the last partial batch
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb = augment(fit.data[idx], gen).contiguous(memory_format=torch.channels_last)
            yb = y_fit[idx]
            if mixup > 0:
                lam = float(beta_rng.beta(mixup, mixup))
                perm = torch.randperm(len(idx), generator=gen)
                logits = net(lam * xb + (1 - lam) * xb[perm])
                loss = lam * F.cross_entropy(logits, yb) + (1 - lam) * F.cross_entropy(
                    logits, yb[perm]
                )
            else:
                loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(
            f"[{name}] epoch {epoch + 1}/{epochs} loss {total / (i + 1):.4f} "
            f"elapsed {time.perf_counter() - start:.0f}s "
            f"(CPU {time.process_time() - cpu_start:.0f}s)",
            flush=True,
        )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    net = net.to(memory_format=torch.contiguous_format).eval()
    acc = accuracy(net, test.data, y_test)
    fit_acc = accuracy(net, fit.data[:10_000], y_fit[:10_000])
    print(
        f"[{name}] done: train wall time {wall:.0f}s (CPU time {cpu:.0f}s), "
        f"test accuracy {acc:.4f} ({len(y_test)} images), "
        f"fit accuracy (first 10k) {fit_acc:.4f}",
        flush=True,
    )
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.pt"
    torch.save(state, path)
    print(f"[{name}] saved {path} ({path.stat().st_size / 1024:.0f} KiB)", flush=True)


def run(name: str, args: argparse.Namespace) -> None:
    """Train one model in this process with the requested determinism settings."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    mixup = MIXUP_ALPHA[name] if args.mixup is None else args.mixup
    train(name, args.epochs, args.batch_size, args.lr, args.seed, args.out, mixup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=["fmnist", "fmnist_near", "all"],
        default="all",
        help="'all' trains both models concurrently, one process each",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mixup",
        type=float,
        default=None,
        help=f"mixup Beta alpha, 0 = off (default per model: {MIXUP_ALPHA})",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="folder for the .pt files")
    args = parser.parse_args()
    if args.model != "all":
        run(args.model, args)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        for future in [pool.submit(run, name, args) for name in ("fmnist", "fmnist_near")]:
            future.result()


if __name__ == "__main__":
    main()
