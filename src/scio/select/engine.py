"""The shared engine of :mod:`scio.select`: every grid point of every candidate score is fit
with one recorded forward per calibration batch (:func:`scio.scores.fit_jointly`) and
evaluated with one recorded forward per validation batch (:class:`scio.scores.JointInference`).

Scores taking input gradients (e.g. ODIN or Mahalanobis with ``epsilon > 0``) cannot reuse
a forward: each such grid point runs its own passes over the validation data, with a
progress bar.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from torch import Tensor, nn

from scio.recorder import DepthIdx
from scio.scores import BaseScoreClassif, JointInference, fit_jointly

__all__ = ["Candidate", "check_data", "fit_candidates", "progress_bar", "validation_confidences"]

FloatArray = npt.NDArray[np.float64]


@dataclass
class Candidate:
    """One score to fit (unless ``fitted``) on ``layers`` and to evaluate on validation data."""

    score: BaseScoreClassif
    layers: tuple[DepthIdx | str, ...]
    fitted: bool = False


def progress_bar(show: bool) -> Progress:
    """A rich progress bar (hidden when ``show`` is false)."""
    return Progress(
        SpinnerColumn(finished_text="✓"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        disable=not show,
    )


def n_samples(data: Any) -> int | None:
    """Number of samples of a tensor or of a ``DataLoader``-like object (if known)."""
    if isinstance(data, Tensor):
        return len(data)
    dataset = getattr(data, "dataset", None)
    return len(dataset) if isinstance(dataset, Sized) else None


def _first_inputs(data: Any, name: str, *, reread: bool) -> Tensor | None:
    """The first input batch of ``data`` without consuming it (``None`` for an iterator
    when ``reread`` is false: it is read once, by the fit)."""
    if isinstance(data, Tensor):
        return data
    if not isinstance(data, Iterable) or isinstance(data, str | bytes):
        msg = f"`{name}` must be a tensor or an iterable of input batches (got {type(data)})"
        raise TypeError(msg)
    if iter(data) is data:
        if not reread:
            return None
        msg = (
            f"`{name}` must be a tensor or a collection of batches that can be read several "
            f"times (e.g. a DataLoader or a list), not a one-shot iterator ({type(data).__name__})"
        )
        raise TypeError(msg)
    first = next(iter(data), None)
    if isinstance(first, tuple | list) and first:
        first = first[0]
    if first is None:
        msg = f"`{name}` holds no batch: it needs at least one sample"
        raise ValueError(msg)
    if not isinstance(first, Tensor):
        msg = f"`{name}` batches must be tensors or (inputs, ...) tuples (got {type(first)})"
        raise TypeError(msg)
    return first


def check_data(calib_data: Any, val_id: Any, val_ood: Any) -> None:
    """Raise before any forward if the validation sets are empty, or if the per-sample
    shapes of ``val_ood``, ``val_id`` and ``calib_data`` differ."""
    shapes = {}
    for name, data, reread in (
        ("calib_data", calib_data, False),
        ("val_id", val_id, True),
        ("val_ood", val_ood, True),
    ):
        first = _first_inputs(data, name, reread=reread)
        if first is None:
            continue
        if first.ndim == 0 or (name != "calib_data" and len(first) == 0):
            msg = f"`{name}` must hold at least one sample (got shape {tuple(first.shape)})"
            raise ValueError(msg)
        shapes[name] = tuple(first.shape[1:])
    if shapes["val_ood"] != shapes["val_id"]:
        msg = (
            f"`val_ood` samples have shape {shapes['val_ood']} but `val_id` samples have shape "
            f"{shapes['val_id']}: both must be inputs of the same network"
        )
        raise ValueError(msg)
    if "calib_data" in shapes and shapes["calib_data"] != shapes["val_id"]:
        msg = (
            f"`val_id` samples have shape {shapes['val_id']} but `calib_data` samples have "
            f"shape {shapes['calib_data']}"
        )
        raise ValueError(msg)


def fit_candidates(
    candidates: Sequence[Candidate],
    net: nn.Module,
    calib_data: Any,
    calib_labels: Any,
    *,
    batch_size: int | None,
    progress: Progress,
) -> None:
    """Fit every unfitted candidate with **one** forward per calibration batch."""
    todo = [c for c in candidates if not c.fitted]
    if not todo:
        return
    total = n_samples(calib_data)
    task = progress.add_task(
        f"Calibration: {len(todo)} grid point(s), one forward per batch", total=total
    )

    def on_batch(n_done: int) -> None:
        progress.update(task, completed=n_done)

    # the caller's recorder already checked (or skipped checking) the network's control flow
    fit_jointly(
        [(c.score, c.layers) for c in todo],
        net,
        calib_data,
        calib_labels,
        batch_size=batch_size,
        on_batch=on_batch,
        force_static_flow=False,
    )
    done = next(t.completed for t in progress.tasks if t.id == task)
    progress.update(task, total=total or done, completed=total or done)


def _input_batches(data: Any, batch_size: int | None) -> Iterator[Tensor]:
    if isinstance(data, Tensor):
        size = len(data) if batch_size is None else batch_size
        for start in range(0, len(data), max(size, 1)):
            yield data[start : start + size]
        return
    for batch in data:
        yield batch if isinstance(batch, Tensor) else batch[0]


def _predicted(out: Tensor, conformity: Tensor) -> FloatArray:
    """Confidence = conformity of the predicted class, as :mod:`scio.eval` ranks it."""
    if conformity.ndim == 2:
        conformity = conformity.gather(1, out.argmax(1, keepdim=True)).squeeze(1)
    return conformity.detach().to("cpu", torch.float64).numpy()


def _needs_input_grad(score: BaseScoreClassif) -> bool:
    return bool(score._inference_needs_grad)


def validation_confidences(
    scores: Sequence[BaseScoreClassif],
    val_id: Any,
    val_ood: Any,
    *,
    batch_size: int | None,
    progress: Progress,
) -> tuple[FloatArray, FloatArray]:
    """Confidences ``(n_scores, n_id)`` and ``(n_scores, n_ood)`` of fitted scores.

    Scores without input gradients share one recorded forward per batch (one
    :class:`~scio.scores.JointInference`); each score with input gradients runs its own
    passes (its own progress task).
    """
    shared = [i for i, score in enumerate(scores) if not _needs_input_grad(score)]
    own = [i for i, score in enumerate(scores) if _needs_input_grad(score)]
    sets = (val_id, val_ood)
    sizes = [n_samples(data) for data in sets]
    total = None if None in sizes else sum(s for s in sizes if s is not None)
    rows: list[list[FloatArray | None]] = [[None] * len(scores) for _ in sets]
    if shared:
        task = progress.add_task(
            f"Validation: {len(shared)} grid point(s), one forward per batch", total=total
        )
        joint = JointInference([scores[i] for i in shared])
        _run_group(joint, shared, sets, rows, batch_size, progress, task)
    if own:
        task = progress.add_task(
            f"Validation: {len(own)} input-gradient grid point(s), own passes",
            total=None if total is None else total * len(own),
        )
        for i in own:
            _run_group(scores[i], [i], sets, rows, batch_size, progress, task)
    conf_id, conf_ood = (np.stack([row for row in per_set if row is not None]) for per_set in rows)
    return conf_id, conf_ood


def _run_group(
    runner: JointInference | BaseScoreClassif,
    indices: list[int],
    sets: tuple[Any, Any],
    rows: list[list[FloatArray | None]],
    batch_size: int | None,
    progress: Progress,
    task: TaskID,
) -> None:
    for data, row in zip(sets, rows):
        batches = _input_batches(data, batch_size)
        if isinstance(runner, JointInference):
            done = [0]

            def on_batch(n_done: int, done: list[int] = done) -> None:
                progress.advance(task, n_done - done[0])
                done[0] = n_done

            results = runner.run(batches, on_batch=on_batch)
        else:  # one score with input gradients: its own passes, batch by batch
            outs, confs = [], []
            for inputs in batches:
                out, conformity = runner(inputs)
                outs.append(out.detach())
                confs.append(conformity.detach())
                progress.advance(task, len(inputs))
            results = [(torch.cat(outs), torch.cat(confs))]
        for i, (out, conformity) in zip(indices, results):
            row[i] = _predicted(out, conformity)
