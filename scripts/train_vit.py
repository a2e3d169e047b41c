#!/usr/bin/env python
"""Train the Fashion-MNIST ViTs shipped in ``scio/models/weights`` (reproducible).

Usage (from the repository root, scio installed, Fashion-MNIST package present)::

    python scripts/train_vit.py                        # both models at once, 1 thread each
    python scripts/train_vit.py --model vit_fmnist     # one model (--model vit_fmnist_near)

Same data split as ``scripts/train_fmnist.py``: trains on the ``"fit"`` part of the official
training split (indices 0-54,999); the last 5,000 training images (calibration) and the test
split are never trained on, the test split only *reports* the final accuracy (no model
selection). ``vit_fmnist_near`` is trained without the classes Shirt and Ankle boot.
Recipe: AdamW (weight decay 0.05), one-cycle learning rate (max 1e-3), batch 128, gradient
norm clipped at 1, cross-entropy, the CNNs' augmentation (random horizontal flip, shift by up
to 2 pixels). Fixed seeds, deterministic algorithms and a fixed thread count (default 1 per
model): a rerun on the same machine and software gives bit-identical weights.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from train_fmnist import augment  # same folder: the CNNs' augmentation, unchanged

from scio.datasets import fashion_mnist
from scio.models.fmnist import FMNIST_CLASSES, FMNIST_NEAR_CLASS_IDS, fmnist_near_targets
from scio.models.vit import ViT

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "scio" / "models" / "weights"
MODELS = ("vit_fmnist", "vit_fmnist_near")


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    net.eval()
    preds = torch.cat([net(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return (preds == y).float().mean().item()


def train(name: str, args: argparse.Namespace) -> None:
    """Train ``name`` (one of :data:`MODELS`) and save its ``state_dict`` to ``args.out``."""
    near = name == "vit_fmnist_near"
    classes = FMNIST_NEAR_CLASS_IDS if near else None
    fit = fashion_mnist("fit", classes=classes)
    test = fashion_mnist("test", classes=classes)
    x_fit, y_fit, y_test = fit.data, fit.labels, test.labels
    if near:
        y_fit, y_test = fmnist_near_targets(y_fit), fmnist_near_targets(y_test)
    if args.n_fit:  # quick smoke runs only; the shipped weights use every fit image
        x_fit, y_fit = x_fit[: args.n_fit], y_fit[: args.n_fit]
    n_classes = len(FMNIST_NEAR_CLASS_IDS) if near else len(FMNIST_CLASSES)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    net = ViT(n_classes)
    n_params = sum(p.numel() for p in net.parameters())
    steps_per_epoch = len(y_fit) // args.batch_size  # drop the last partial batch
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch
    )
    print(
        f"[{name}] {len(y_fit)} fit images, {n_classes} classes, {n_params} parameters, "
        f"{args.epochs} epochs",
        flush=True,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(y_fit), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(net(augment(x_fit[idx], gen)), y_fit[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item()
        print(
            f"[{name}] epoch {epoch + 1}/{args.epochs} loss {total / steps_per_epoch:.4f} "
            f"elapsed {time.perf_counter() - start:.0f}s "
            f"(CPU {time.process_time() - cpu_start:.0f}s)",
            flush=True,
        )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    net.eval()
    acc = accuracy(net, test.data, y_test)
    fit_acc = accuracy(net, x_fit[:10_000], y_fit[:10_000])
    print(
        f"[{name}] done: train wall time {wall:.0f}s (CPU time {cpu:.0f}s), "
        f"test accuracy {acc:.4f} ({len(y_test)} images), "
        f"fit accuracy (first 10k) {fit_acc:.4f}",
        flush=True,
    )
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.pt"
    torch.save(state, path)
    print(f"[{name}] saved {path} ({path.stat().st_size / 1024:.0f} KiB)", flush=True)


def run(name: str, args: argparse.Namespace) -> None:
    """Train one model in this process with the requested determinism settings."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    train(name, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=[*MODELS, "all"],
        default="all",
        help="'all' trains both models concurrently, one process each",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--n-fit", type=int, default=0, help="smoke runs: first N fit images")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="folder for the .pt files")
    args = parser.parse_args()
    if args.model != "all":
        run(args.model, args)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        for future in [pool.submit(run, name, args) for name in MODELS]:
            future.result()


if __name__ == "__main__":
    main()
