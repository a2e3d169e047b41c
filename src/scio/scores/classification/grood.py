"""GROOD: nearest neighbour among the gradients of a prototype classifier w.r.t. an OoD
prototype."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch, validate_labels
from scio.scores.utils import Index, make_indexes

__all__ = ["GROOD", "OOD_LABEL", "grood_gradients", "kept_positions"]

#: Calibration label marking an OoD sample (used for the noise prototype).
OOD_LABEL = -1


def kept_positions(n: int, ratio: float, device: torch.device) -> Tensor:
    """Boolean mask of the stream positions ``i < n`` kept by a ``ratio``: those where
    ``⌊(i + 1) · ratio⌋ > ⌊i · ratio⌋`` (evenly spread, all of them for ``ratio = 1``)."""
    positions = torch.arange(n + 1, device=device, dtype=torch.float64) * ratio
    steps = positions.floor()
    return steps[1:] > steps[:-1]


def grood_gradients(features: Tensor, prototypes: Tensor, noise_prototype: Tensor) -> Tensor:
    """``∂ CE(s, ŷ) / ∂ p_ood = softmax(s)_ood · (h - p_ood) / ||h - p_ood||`` ``(n, d)`` with
    ``s = (-||h - p_1||, …, -||h - p_C||, -||h - p_ood||)`` the nearest-prototype logits
    (any class ``ŷ ≤ C``: the OoD prototype is never the target)."""
    centres = torch.cat([prototypes, noise_prototype[None]]).to(features)
    distances = torch.cdist(features, centres, compute_mode="donot_use_mm_for_euclid_dist")
    p_ood = torch.softmax(-distances, dim=1)[:, -1:]
    return p_ood * F.normalize(features - centres[-1], dim=1)


class GROOD(StreamingCalibration, BaseScoreClassif):
    """GROOD (ElAraby et al., "GROOD: Gradient-Aware Out-of-Distribution Detection", 2023;
    OpenOOD's ``grood`` postprocessor).

    Idea: a nearest-prototype classifier on the penultimate features, with one prototype per
    class and one for OoD data, has a gradient w.r.t. the OoD prototype that points
    differently for in-distribution inputs and OoD ones; an input whose gradient is far
    from every gradient of the (correctly classified) calibration data is OoD.

    Formula: ``p_c`` = mean feature ``h`` of the calibration samples of class ``c`` (0 for
    an absent class), ``p_ood`` = mean feature of the first ``n_noise_samples`` calibration
    samples labelled ``-1`` (:data:`OOD_LABEL`, OpenOOD's OoD validation set; 0 when there is
    none), or the mean of the ``p_c`` with ``use_proto_mean``. With the logits
    ``s = -(||h - p_1||, …, ||h - p_C||, ||h - p_ood||)``, the gradient of the cross-entropy
    w.r.t. ``p_ood`` is ``g(h) = softmax(s)_ood · (h - p_ood) / ||h - p_ood||``. Conformity
    ``-||g(h) - g_(k)||²``, ``g_(k)`` its ``k``-th nearest gradient among the calibration
    samples whose label equals the network's prediction, identical for every class.

    Args:
        k: rank of the neighbour (default 1, OpenOOD's search).
        n_noise_samples: OoD samples averaged into ``p_ood`` (default 100).
        sampling_ratio: fraction ``(0, 1]`` of the calibration samples used (evenly spread
            in the stream; OpenOOD keeps the first batches). Default 1.
        use_val_ood: build ``p_ood`` from the samples labelled ``-1`` (default ``True``).
        use_proto_mean: ``p_ood`` = mean of the class prototypes instead (default ``False``).
        no_gradients: conformity ``||h - p_ood||`` instead (default ``False``).
        use_grad_norm: conformity ``-||g(h)||₁`` instead (default ``False``).
        act_norm: normalisation of the recorded features (default ``None``: raw, as OpenOOD).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Record the penultimate features (the head's input). Labels are required; ``-1`` marks
    OoD samples, which are used only for ``p_ood`` (ignored when ``use_val_ood`` is off).
    Without OoD sample ``p_ood`` is the origin, as OpenOOD without OoD data (a warning says
    so). The gradient is the closed form of OpenOOD's autograd one (its ``use_direct_grad``);
    the search is exact (OpenOOD: a faiss IVF index, ``nprobe=4``). OpenOOD's synthetic
    (mixup), Gaussian-noise, cosine and pseudo-prototype variants are not offered.

    Cost: calibration keeps the ``(n_calib, d)`` features, labels and predictions; at the end
    one prototype pass and one ``(n_calib × (C + 1))`` distance product. Inference: the
    recorded forward, ``n × (C + 1)`` distances and one exact nearest-neighbour search among
    the kept gradients.
    """

    k: int = 1
    n_noise_samples: int = 100
    sampling_ratio: float = 1.0
    use_val_ood: bool = True
    use_proto_mean: bool = False
    no_gradients: bool = False
    use_grad_norm: bool = False

    _fitted_attrs: ClassVar[tuple[str, ...]] = ("prototypes", "noise_prototype", "index")

    def _check_param_value(self, name: str, value: Any) -> None:
        _validate(name, value)
        super()._check_param_value(name, value)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        for name in ("k", "n_noise_samples", "sampling_ratio", *_FLAGS):
            _validate(name, getattr(self, name))

    def _features(self, activations: tuple[Tensor, ...]) -> Tensor:
        (features,) = self.normalize(activations, concatenate=True)
        return features.to(torch.float64 if features.dtype == torch.float64 else torch.float32)

    def _calib_update(self, batch: CalibBatch) -> None:
        features = self._features(batch.activations)
        out = batch.out
        labels = _labels(batch.labels, len(features), out.shape[1]).to(features.device)
        state = self._state
        state.append("features", features)
        state.append("labels", labels)
        state.append("preds", out.argmax(dim=1).to(features.device))
        state.append("n_classes", torch.tensor([out.shape[1]]))

    def _calib_end(self) -> None:
        state = self._state
        features, labels, preds = (state.cat(name) for name in ("features", "labels", "preds"))
        n_classes = int(state.cat("n_classes").max())
        ood = labels == OOD_LABEL
        kept = kept_positions(len(labels), self.sampling_ratio, labels.device) & ~ood
        ind, ind_labels = features[kept], labels[kept]
        counts = torch.bincount(ind_labels, minlength=n_classes).to(features.dtype)
        sums = torch.zeros(n_classes, features.shape[1], dtype=features.dtype)
        sums = sums.to(features.device).index_add_(0, ind_labels, ind)
        prototypes = sums / counts.clamp(min=1)[:, None]
        noise = torch.zeros_like(features[0])
        if self.use_proto_mean:
            noise = prototypes.mean(dim=0)
        elif self.use_val_ood:
            if bool(ood.any()):
                noise = features[ood][: self.n_noise_samples].mean(dim=0)
            else:
                warnings.warn(
                    "GROOD: no calibration sample is labelled -1 (OoD), so the OoD prototype "
                    "is the origin (OpenOOD without OoD data); pass OoD samples labelled -1, "
                    "or use `use_proto_mean=True` or `use_val_ood=False`",
                    UserWarning,
                    stacklevel=2,
                )
        self.prototypes: Tensor = prototypes
        self.noise_prototype: Tensor = noise
        self.index: Index | None = None
        if self.no_gradients or self.use_grad_norm:
            return
        correct = kept & (labels == preds)
        n_kept = int(correct.sum())
        if self.k > n_kept:
            msg = (
                f"`k` must not exceed the {n_kept} correctly classified calibration samples "
                f"whose gradients are indexed (got k={self.k})"
            )
            raise ParamError(msg)
        gradients = grood_gradients(features[correct], prototypes, noise)
        self.index = make_indexes(gradients, metric="l2")

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        features = self._features(tuple(self.rnet.activations.values()))
        if self.no_gradients:
            distance = (features - self.noise_prototype.to(features)).norm(dim=1)
            return out, distance.to(out.dtype)
        gradients = grood_gradients(features, self.prototypes, self.noise_prototype)
        if self.use_grad_norm:
            return out, (-gradients.abs().sum(dim=1)).to(out.dtype)
        assert self.index is not None
        distances = self.index.search(gradients, self.k)[0][:, -1]
        return out, (-distances).to(out.dtype)


def _labels(labels: Any, n: int, n_classes: int) -> Tensor:
    """Labels as int64, each in ``[0, n_classes)`` or ``-1`` (OoD)."""
    if labels is None:
        msg = "GROOD needs `calib_labels` (class indices, -1 for OoD samples)"
        raise ValueError(msg)
    flat = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    if flat.ndim == 1 and len(flat) == n and not flat.dtype.is_floating_point:
        ind = flat[flat != OOD_LABEL]
        try:
            validate_labels(ind, len(ind), n_classes)
        except ValueError as exc:
            raise ValueError(f"{exc} (or -1 for OoD samples)") from None
        return flat.to(torch.int64)
    return validate_labels(labels, n, n_classes)  # raises with the reason


_FLAGS = ("use_val_ood", "use_proto_mean", "no_gradients", "use_grad_norm")


def _validate(name: str, value: Any) -> None:
    """Raise ``ParamError`` naming ``name`` unless ``value`` is valid for it."""
    if name in ("k", "n_noise_samples"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"`{name}` must be a positive integer (got {value!r})"
            raise ParamError(msg)
    elif name == "sampling_ratio":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not 0 < value <= 1 or math.isnan(value):
            msg = f"`sampling_ratio` must lie in (0, 1] (got {value!r})"
            raise ParamError(msg)
    elif name in _FLAGS and not isinstance(value, bool):
        msg = f"`{name}` must be a bool (got {value!r})"
        raise ParamError(msg)
