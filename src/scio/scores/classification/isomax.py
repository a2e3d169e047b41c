"""IsoMax: post-hoc isotropic distance-based logits with learned prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch, validate_labels
from scio.scores.core.validation import ParamRange, param_ranges

__all__ = ["IsoMax"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class IsoMax(StreamingCalibration, BaseScoreClassif):
    """IsoMax (Macêdo et al., "Entropic Out-of-Distribution Detection: Seamless Detection of
    Unknown Examples", IEEE TNNLS 2022), used post hoc.

    Idea: replace the affine last layer by isotropic distances to class prototypes, scaled by
    an entropic factor, so that the softmax only saturates close to a prototype. Here the
    network is not retrained: one prototype per class is learned in logit space on the
    labelled calibration set, and the network's logits are read as the features.

    Formula: with ``z`` the logits and ``P_c`` the learned prototypes (``C x C`` matrix,
    initialised at 0), ``m(z)_c = -entropic_scale * ||z - P_c||_{dist_norm}``. ``P`` is
    trained with Adam (``lr``; ``eps = 1e-4`` in float16, else ``1e-8``) for ``n_steps`` full
    batch steps of the cross-entropy of ``m(logits)`` against ``calib_labels``. Conformity
    ``c_j = softmax(m(z))_j``.

    Args:
        entropic_scale: scale ``s`` of the distances (default 10, the paper's value).
        dist_norm: order of the distance norm (default 2).
        lr: Adam learning rate, ``> 0``.
        n_steps: number of optimisation steps, ``>= 0`` (0 keeps ``P = 0``).
        act_norm: unused (no recorded layer is read).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    ``calib_labels`` must be integers in ``[0, C)``, one per sample (absent classes are
    fine: their prototype is only pushed away from the data).

    Fitted state: ``prototypes`` (``C x C``, dtype and device of the logits).

    Cost: calibration keeps the ``(n_calib, C)`` logits and the labels (the shared
    recording forward, nothing else), then runs ``n_steps`` deterministic full-batch
    optimisation steps (each ``O(n_calib * C^2)``, with autograd). Inference: one forward
    plus an ``(n, C) x (C, C)`` distance computation. Distances are computed in float32 for
    half precision (the prototypes keep the logits' dtype).
    """

    entropic_scale: float = 10.0
    dist_norm: float = 2.0
    lr: float = 0.1
    n_steps: int = 1000

    _fitted_attrs = ("prototypes",)

    _param_ranges = param_ranges(
        lr=ParamRange.interval(0),
        n_steps=ParamRange.interval(0, low_open=False, integer=True),
    )

    @property
    def _calib_needs_grad(self) -> bool:
        return True

    def _isometric_logits(self, logits: Tensor, prototypes: Tensor) -> Tensor:
        """``-entropic_scale * ||z - P_c||`` for every sample and class, in working dtype."""
        work = _work_dtype(logits.dtype)
        distances = torch.cdist(
            logits.to(work),
            prototypes.to(work),
            p=self.dist_norm,
            compute_mode="donot_use_mm_for_euclid_dist",
        )
        return -self.entropic_scale * distances

    def _calib_update(self, batch: CalibBatch) -> None:
        logits = batch.out
        labels = validate_labels(batch.labels, len(batch), logits.shape[1])
        self._state.append("logits", logits)
        self._state.append("labels", labels.to(logits.device))

    def _calib_end(self) -> None:
        logits = self._state.cat("logits")
        labels = self._state.cat("labels")
        n_classes = logits.shape[1]
        prototypes = torch.zeros(
            (n_classes, n_classes), dtype=logits.dtype, device=logits.device, requires_grad=True
        )
        eps = 1e-4 if logits.dtype == torch.float16 else 1e-8
        optimizer = torch.optim.Adam([prototypes], lr=self.lr, eps=eps)
        for _ in range(self.n_steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(self._isometric_logits(logits, prototypes), labels)
            loss.backward()
            optimizer.step()
        self.prototypes: Tensor = prototypes.detach()

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs, dont_record=True)
        conformity = self._isometric_logits(out, self.prototypes.to(out.device)).softmax(dim=1)
        return out, conformity.to(out.dtype)
