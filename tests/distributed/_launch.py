"""Run a function on ranks in spawned processes (2 gloo ranks by default), with a bounded
wait (no hang)."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT_S = 120.0
WORLD = 2


def _entry(fn: Callable[[int], Any], rank: int, tmp: str, backend: str, world: int) -> None:
    torch.set_num_threads(1)
    out = Path(tmp) / f"result{rank}.pkl"
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{tmp}/rendezvous",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=TIMEOUT_S / 2),
        )
        try:
            result: Any = ("ok", fn(rank))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # reported to the parent, which fails the test
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    out.write_bytes(pickle.dumps(result))


def run_ranks(
    fn: Callable[[int], Any], tmp: Path, *, backend: str = "gloo", world: int = WORLD
) -> list[tuple[str, Any]]:
    """``[(status, value)]`` per rank; fails (kills the ranks) if they do not end in time."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, str(tmp), backend, world))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(TIMEOUT_S)
    alive = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if alive:
        msg = f"ranks {alive} did not finish within {TIMEOUT_S} s (hang)"
        raise AssertionError(msg)
    results = []
    for rank in range(world):
        path = tmp / f"result{rank}.pkl"
        assert path.exists(), f"rank {rank} exited with code {procs[rank].exitcode} and no result"
        results.append(pickle.loads(path.read_bytes()))
    return results
