"""Run many fitted scores on one network with one recorded forward per batch.

The inference twin of :func:`scio.scores.fit_jointly`. One recorder records the union of
every score's layers (and taps every classifier head); its forward on a batch is published
to the scores' own recorders (:class:`scio.recorder.SharedForward`), so a score's
``rnet(inputs)`` returns the shared logits and activations instead of running the network.
Each score then runs exactly its own code on exactly the same tensors, so the result equals
``score(inputs)`` bit for bit; scores that need extra passes by design (ODIN and
Mahalanobis with ε > 0, FeatureSqueezing, Odds, input gradients, shaped forwards) still run
those extra passes themselves, and only those.

Timing: each score's timer gets **one** ``"inference"`` entry per call, holding only the
score's own work (its extra passes, its post-processing); the shared forward is not charged
to any score. It is reported separately in :attr:`JointInference.shared_seconds` (and
per call in :attr:`JointInference.last_shared_seconds`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from time import perf_counter
from typing import Any

import torch
from torch import Tensor, nn

from scio.recorder import Recorder, SharedForward, shared_forward
from scio.recorder.io import batch_size as count_rows  # `batch_size` is a parameter below
from scio.recorder.io import take_rows, unwrap_single
from scio.scores.core.base import BaseScore
from scio.scores.core.fitted import fitted_scores
from scio.scores.core.validation import eval_mode, merge_rows, nonfinite_rows

__all__ = ["JointInference", "infer_jointly"]


def _score_name(i: int, score: BaseScore) -> str:
    return f"scores[{i}] ({type(score).__name__})"


class JointInference:
    """Many fitted scores sharing one network, evaluated with one forward per batch.

    Args:
        scores: fitted scores, all fit on recorders of the **same** network object.

    Raises:
        RuntimeError: a score is not fit.
        ValueError: no score, or two scores fit on different networks (names both).

    Example::

        joint = JointInference([knn, mahalanobis, energy])
        (out, c_knn), (_, c_maha), (_, c_energy) = joint(inputs)
    """

    def __init__(self, scores: Sequence[BaseScore]) -> None:
        scores = fitted_scores(scores, unfit_error=RuntimeError, hint="fit it before inference")
        net = scores[0].rnet.net
        for i, score in enumerate(scores[1:], 1):
            if score.rnet.net is not net:
                msg = (
                    f"{_score_name(0, scores[0])} and {_score_name(i, score)} were fit on "
                    "different networks: joint inference needs one network object"
                )
                raise ValueError(msg)
        self.scores = scores
        self.net: nn.Module = net
        self._union: Recorder | None = None
        self.shared_seconds = 0.0
        self.last_shared_seconds = 0.0

    def _union_recorder(self, inputs: Tensor) -> Recorder:
        if self._union is None:
            for score in self.scores:
                score._bind_taps()  # e.g. a classifier head's input on the score's recorder
            first = self.scores[0].rnet
            example = take_rows(inputs, slice(0, 1))
            if first._input_key is not None and isinstance(example, Tensor):
                example = {first._input_key: example}  # called as the scores' recorders are
            union = Recorder(
                self.net, input_data=example, force_static_flow=False, output=first._output
            )
            layers = {d for score in self.scores for d in score.rnet.recording}
            union.record(*sorted(layers))
            union._tap(*(m for score in self.scores for m in score.rnet._taps))
            self._union = union
        return self._union

    def _as_input(self, inputs: Any) -> Any:
        """A dict holding only the recorders' one input key, as its tensor (``score(x)``)."""
        return unwrap_single(inputs, self.scores[0].rnet._input_key)

    def _check(self, inputs: Tensor) -> None:
        """Check ``inputs`` for every score (as ``score(inputs)`` does)."""
        for score in self.scores:
            score._check_ready(inputs)

    def _shared(self, inputs: Tensor) -> SharedForward:
        """The one shared recorded forward on (checked, finite) ``inputs``."""
        union = self._union_recorder(inputs)
        start = perf_counter()
        with torch.no_grad(), eval_mode(self.net):
            out = union(inputs)
        shared = SharedForward(
            net=self.net,
            inputs=inputs,
            out=out,
            rows=union._rows_key,
            activations=dict(union.activations),
            tapped=dict(union._tapped_calls),
        )
        seconds = perf_counter() - start
        self.last_shared_seconds += seconds
        self.shared_seconds += seconds
        return shared

    def _batch(self, inputs: Tensor, own: list[float]) -> list[tuple[Tensor, Tensor]]:
        """Every score's result on one checked batch (``own[i]``: seconds of score ``i``'s
        own work, added to). Samples holding NaN or ±inf are left out of the shared forward
        and of every score, as ``score(inputs)`` does: they get their own network output
        (one forward of just those rows, shared by the scores) and a NaN conformity."""
        bad = nonfinite_rows(inputs)
        finite = inputs if bad is None else take_rows(inputs, ~bad)
        results: list[Any] = [None] * len(self.scores)
        if bad is None or not bool(bad.all()):
            with shared_forward(self._shared(finite)):
                for i, score in enumerate(self.scores):
                    start = perf_counter()
                    results[i] = score._infer(finite)
                    own[i] += perf_counter() - start
        if bad is None:
            return results
        start = perf_counter()
        with torch.no_grad(), eval_mode(self.net):
            out_bad = self._union_recorder(inputs)(take_rows(inputs, bad), dont_record=True)
        seconds = perf_counter() - start
        self.last_shared_seconds += seconds
        self.shared_seconds += seconds
        return [
            merge_rows(bad, out_bad, result, score._nan_conformity)
            for score, result in zip(self.scores, results, strict=True)
        ]

    def __call__(self, inputs: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``[score(inputs) for score in scores]`` with one shared forward."""
        inputs = self._as_input(inputs)
        self._check(inputs)
        self.last_shared_seconds = 0.0
        own = [0.0] * len(self.scores)
        results = self._batch(inputs, own)
        for score, seconds in zip(self.scores, own, strict=True):
            score.timer.add("inference", count_rows(inputs), seconds)
        return results

    def run(
        self, batches: Iterable[Tensor], *, on_batch: Any = None
    ) -> list[tuple[Tensor, Tensor]]:
        """Results over a stream of input batches, concatenated per score.

        Each score's timer gets one entry for the whole stream (its own work only).

        Args:
            batches: input tensors (e.g. slices of a big tensor, or a loader's inputs).
            on_batch: called with the number of inputs done after each batch.
        """
        outs: list[list[Tensor]] = [[] for _ in self.scores]
        confs: list[list[Tensor]] = [[] for _ in self.scores]
        own = [0.0] * len(self.scores)
        n_done = 0
        for batch in batches:
            inputs = self._as_input(batch)
            self._check(inputs)
            self.last_shared_seconds = 0.0
            for i, (score_out, conformity) in enumerate(self._batch(inputs, own)):
                outs[i].append(score_out)
                confs[i].append(conformity)
            n_done += count_rows(inputs)
            if on_batch is not None:
                on_batch(n_done)
        if n_done == 0:
            msg = "`batches` must hold at least one input batch (got none)"
            raise ValueError(msg)
        for score, seconds in zip(self.scores, own):
            score.timer.add("inference", n_done, seconds)
        return [
            (torch.cat(o) if len(o) > 1 else o[0], torch.cat(c) if len(c) > 1 else c[0])
            for o, c in zip(outs, confs)
        ]


def infer_jointly(
    scores: Sequence[BaseScore], inputs: Tensor, *, batch_size: int | None = None
) -> list[tuple[Tensor, Tensor]]:
    """``[score(inputs) for score in scores]`` with one recorded forward per batch.

    Args:
        scores: fitted scores sharing one network (see :class:`JointInference`).
        inputs: the input batch.
        batch_size: split ``inputs`` in batches of this size (default: one batch); each
            score's timer still gets one entry for the call.

    Returns:
        One ``(out, conformity)`` pair per score, in input order.
    """
    joint = JointInference(scores)
    n = count_rows(inputs)
    if batch_size is None or batch_size >= n:
        return joint(inputs)
    if batch_size <= 0:
        msg = f"`batch_size` must be a positive integer (got {batch_size})"
        raise ValueError(msg)
    return joint.run(take_rows(inputs, slice(i, i + batch_size)) for i in range(0, n, batch_size))
