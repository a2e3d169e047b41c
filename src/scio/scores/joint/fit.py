"""Fit many scores on one network with a single feature pass over the calibration data."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from time import perf_counter
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from scio.recorder import DepthIdx, Recorder
from scio.recorder.io import batch_size as count_rows
from scio.recorder.io import take_rows, unwrap_single
from scio.scores.core.base import BaseScore, FitSession
from scio.scores.core.calibration import CalibBatch, CalibStream, as_batches
from scio.scores.core.distributed import example_input, report_failure, resolve_group
from scio.scores.core.session import explain_forward_error
from scio.scores.core.validation import eval_mode
from scio.scores.joint.inference import JointInference, infer_jointly

__all__ = ["JointInference", "fit_jointly", "infer_jointly", "split_batches"]


class _Progress(Protocol):
    def __call__(self, n_done: int, /) -> object: ...


def split_batches(inputs: Tensor, labels: Any, batch_size: int | None) -> list[tuple[Tensor, Any]]:
    """Split a tensor or dict batch (and its labels, when they have one entry per sample) in
    batches."""
    n = count_rows(inputs, name="calib_data")
    if batch_size is None or batch_size >= n:
        return [(inputs, labels)]
    if batch_size <= 0:
        msg = f"`batch_size` must be a positive integer (got {batch_size})"
        raise ValueError(msg)
    per_sample = labels is not None and hasattr(labels, "__len__") and len(labels) == n
    return [
        (
            take_rows(inputs, slice(i, i + batch_size)),
            labels[i : i + batch_size] if per_sample else labels,
        )
        for i in range(0, n, batch_size)
    ]


def fit_jointly(
    scores_and_layers: Iterable[tuple[BaseScore, Iterable[DepthIdx | str]]],
    net: nn.Module,
    calib_data: Any,
    calib_labels: Any = None,
    *,
    batch_size: int | None = None,
    on_batch: _Progress | None = None,
    distributed: Any = False,
    nonfinite: str = "drop",
    **recorder_kwargs: Any,
) -> list[BaseScore]:
    """Calibrate every score on ``net`` with one forward pass per calibration batch.

    One recorder records the union of all requested layers; each batch's logits and
    activations are shared by every score (each sees only its own layers, in firing order).
    Each score is bound to its own :class:`~scio.recorder.Recorder` recording its layers,
    exactly as ``score.fit(Recorder(net, ...).record(*layers), ...)`` would.

    Args:
        scores_and_layers: ``(score, layers)`` pairs.
        net: the network shared by every score.
        calib_data: a tensor, or an iterable of ``(inputs, labels)`` batches.
        calib_labels: labels when ``calib_data`` is a tensor.
        batch_size: split a tensor ``calib_data`` into batches of this size.
        on_batch: called with the number of samples processed so far after each batch.
        distributed: ``True`` or a process group: ``calib_data`` is this rank's shard (it may
            be empty) and every score is merged over the ranks (see ``BaseScore.fit``).
        nonfinite: ``"drop"`` (default) or ``"raise"``: calibration samples holding NaN or
            ±inf are dropped before the shared forward, with one warning for the call, or
            refused (see ``BaseScore.fit``).
        **recorder_kwargs: passed to every :class:`~scio.recorder.Recorder`.

    Returns:
        The fitted scores, in input order. If anything raises, every score is left as it
        was before the call.
    """
    pairs = [(score, tuple(layers)) for score, layers in scores_and_layers]
    stream: Iterable[tuple[Tensor, Any]]
    if isinstance(calib_data, Tensor):  # checked and filtered whole, then split in batches
        checked = CalibStream([(calib_data, calib_labels)], nonfinite, single=True)
        n_known: int | None = len(calib_data)
        stream = (
            batch
            for inputs, labels in checked
            for batch in split_batches(inputs, labels, batch_size)
        )
    else:
        batches, n_known = as_batches(calib_data, calib_labels)
        stream = checked = CalibStream(batches, nonfinite)
    group = resolve_group(distributed)
    iterator = iter(stream)
    try:
        first: tuple[Tensor, Any] | None = next(iterator, None)
    except Exception as exc:
        if group is not None:  # the other ranks wait in `example_input`: release them
            report_failure(group, exc)
        raise
    if group is not None:  # an empty rank borrows the probe input of another rank
        probe = example_input(
            group, None if first is None else take_rows(first[0], slice(0, 1)), net
        )
    elif first is None:
        checked.warn(stacklevel=2)
        msg = "`calib_data` is empty: calibration needs at least one sample"
        raise ValueError(msg)
    else:
        probe = take_rows(first[0], slice(0, 1))
    if "input_data" not in recorder_kwargs and "input_size" not in recorder_kwargs:
        recorder_kwargs["input_data"] = probe

    union = Recorder(net, **recorder_kwargs)
    union.record(*chain.from_iterable(layers for _, layers in pairs))
    sessions: list[tuple[FitSession, set[DepthIdx]]] = []
    try:
        for score, layers in pairs:
            rnet = Recorder(net, **recorder_kwargs)
            rnet.record(*layers)
            sessions.append((FitSession(score, rnet, n_known, group=group), set(rnet.recording)))
        with eval_mode(net):
            for session, _ in sessions:
                session.prepare(first[0] if first is not None else probe)  # e.g. head discovery
            union._tap(*(module for session, _ in sessions for module in session.score.rnet._taps))
            _run(sessions, union, chain([first] if first else [], iterator), on_batch)
    except Exception as exc:
        # the other ranks stop at the first score's merge: one report is what they wait for
        if sessions:
            sessions[0][0].abort(exc)
        for session, _ in sessions:
            session.rollback()
        union.remove_hooks()
        raise
    checked.warn(stacklevel=2)
    try:
        for session, _ in sessions:
            session.finish()
    except BaseException:
        for session, _ in sessions:  # all or nothing: the scores fit before are restored too
            session.rollback()
        raise
    finally:
        union.remove_hooks()
    return [score for score, _ in pairs]


def _run(
    sessions: list[tuple[FitSession, set[DepthIdx]]],
    union: Recorder,
    batches: Iterable[tuple[Tensor, Any]],
    on_batch: _Progress | None,
) -> None:
    n_done = 0
    for batch_inputs, labels in batches:
        inputs = unwrap_single(batch_inputs, union._input_key)
        start = perf_counter()
        try:
            with torch.no_grad():
                out = union(inputs)
        except RuntimeError as exc:
            explain_forward_error(exc, inputs, union)
            raise
        recorded = tuple(union.activations.items())
        tapped = dict(union._tapped_inputs)
        shared = perf_counter() - start
        for session, layers in sessions:
            # A forward shared by several scores is charged to none of them (each timer holds
            # its own work, the shared seconds go to ``timer.shared``); alone, it is its own.
            if len(sessions) == 1:
                session.charge(shared)
            else:
                session.score.timer.add_shared("calibration", shared)
            acts = tuple(act for depth_idx, act in recorded if depth_idx in layers)
            taps = {module: tapped[module] for module in session.score.rnet._taps}
            batch = CalibBatch(
                inputs, labels, session.score.rnet, out=out, activations=acts, tapped=taps
            )
            session.update(batch)
        n_done += count_rows(inputs)
        if on_batch is not None:
            on_batch(n_done)
