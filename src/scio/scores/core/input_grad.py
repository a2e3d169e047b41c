"""Input gradients with the network's parameters frozen, and bounded row chunks.

Scores that perturb their inputs along an input gradient (ODIN, Deep Mahalanobis with
``epsilon != 0``) build one autograd graph per forward; its memory grows with the batch.
They run their gradient passes on row chunks of at most ``max_batch`` inputs, with every
parameter of the network temporarily not requiring grad: the backward then computes and
keeps only what the input gradient needs (no parameter gradient, no tensor saved for one).
Multi-pass scores without gradients (Odds, FeatureSqueezing) use the same chunking to bound
the memory of their extra forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from scio.recorder.modes import frozen_parameters
from scio.scores.core.validation import ParamError

__all__ = ["DEFAULT_MAX_BATCH", "by_chunks", "check_max_batch", "frozen_parameters", "row_chunks"]

#: Default rows per gradient pass: about 10 MB of autograd state per CIFAR-sized input on the
#: tutorial model, so well under 1 GB whatever the caller's batch size.
DEFAULT_MAX_BATCH = 64


def check_max_batch(value: object, name: str = "max_batch") -> None:
    """Raise :class:`ParamError` (a ``ValueError``) unless ``value`` is a positive ``int``
    (or ``None``)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"`{name}` must be a positive integer or None (got {value!r})"
        raise ParamError(msg)


def row_chunks(n: int, max_batch: int | None) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``max_batch`` rows (``None``: one slice).

    An empty range still yields one (empty) slice, so per-chunk code runs once.
    """
    step = n if max_batch is None else max_batch
    if n == 0 or step >= n:
        yield slice(0, n)
        return
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def by_chunks(
    fn: Callable[[Tensor], tuple[Tensor, ...]], inputs: Tensor, max_batch: int | None
) -> tuple[Tensor, ...]:
    """``fn`` applied to row chunks of ``inputs`` (see :func:`row_chunks`), each of its
    outputs concatenated along the first dimension. ``fn`` must treat rows independently."""
    parts = []
    for rows in row_chunks(len(inputs), max_batch):
        parts.append(fn(inputs[rows]))
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(outputs) for outputs in zip(*parts))
