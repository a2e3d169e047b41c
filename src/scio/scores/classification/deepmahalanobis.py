"""DeepMahalanobis: class-conditional Gaussians with a shared covariance, per layer."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import BaseScore, StreamingCalibration
from scio.scores.core.calibration import CalibBatch, validate_labels
from scio.scores.core.input_grad import (
    DEFAULT_MAX_BATCH,
    by_chunks,
    frozen_parameters,
)
from scio.scores.core.validation import ParamRange, param_ranges
from scio.scores.utils import batched_grad, fgm_direction, normalize_samples
from scio.scores.utils.covariance import (
    check_covariance_memory,
    compute_dtype,
    mahalanobis_distances,
    precision_matrix,
    whitening_matrix,
)
from scio.utils.misc import check

__all__ = ["DeepMahalanobis"]

_F64 = torch.float64
#: Hyper-parameters used at inference only: changing them keeps the score fit.
_INFERENCE_PARAMS = frozenset({"epsilon", "fgm_norm", "weights", "max_batch"})
#: Rows of a batch converted to float64 at once: ``_CHUNK_ELEMENTS / d`` (128 MiB of float64).
_CHUNK_ELEMENTS = 2**24


def _rescaled_grad(objective: Tensor, z: Tensor, x: Tensor) -> Tensor:
    """Input gradient of ``objective`` (one value per sample) after dividing each sample's
    objective by the max-abs of its gradient w.r.t. the features ``z``.

    The FGM direction is invariant to a positive per-sample scaling, so this rescues the
    direction when the plain backward overflows (typically in float16 with a
    badly-conditioned covariance, whose gradients exceed the float16 range).
    """
    grad_z = batched_grad(objective, z, retain_graph=True)
    scale = grad_z.abs().flatten(1).amax(dim=1).clamp(min=torch.finfo(grad_z.dtype).tiny)
    return batched_grad(objective / scale.detach(), x, retain_graph=True)


class DeepMahalanobis(StreamingCalibration, BaseScoreClassif):
    """Mahalanobis distance to class means (Lee et al., "A Simple Unified Framework for
    Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018).

    Idea: the features of each recorded layer are modelled, per class, by a Gaussian with
    its own mean and a covariance shared by all classes (tied LDA model). An input is
    in-distribution for class ``c`` when its features are close to the mean of ``c`` in the
    Mahalanobis metric of that covariance. Optionally the input is first nudged towards its
    closest class (input pre-processing of the paper) and layers are combined with weights.

    Formula: per layer ``l`` (``act_norm``-normalised, flattened features ``z``), class means
    ``μ_c`` and precision ``P = Σ⁻¹`` of the pooled within-class covariance
    ``Σ = Σ_i (z_i - μ_{y_i})(z_i - μ_{y_i})ᵀ / (N - 1)``,
    ``M_l(x, c) = (z - μ_c)ᵀ P (z - μ_c)`` and ``conformity_c = -Σ_l w_l M_l(x, c)``
    (``-inf`` for classes absent from calibration).

    With ``epsilon != 0``, for each layer: ``ĉ = argmin_c M_l(x, c)``,
    ``x̃ = x + ε · fgm_direction(∇_x(-M_l(x, ĉ)), p=fgm_norm)`` and ``M_l`` is evaluated on
    ``x̃``. If the input gradient overflows, it is recomputed with each sample's objective
    divided by the max-abs of its gradient w.r.t. the features (same direction); if it is
    still not finite, a ``UserWarning`` is emitted and ``x`` is used.
    Unlike the reference, the caller's input tensor is never modified (its
    ``requires_grad`` flag stays as it was): gradients are taken on a detached alias.

    Implementation: calibration streams float64 running sums per layer (class counts, class
    feature sums, ``Σ z zᵀ``), never the features. At the end of calibration the covariance
    is eigen-decomposed once in float64 into a whitening matrix ``W`` (``W Wᵀ = P``), and
    ``μ̃_c = (μ_c - μ̄) W`` is precomputed (``μ̄`` = calibration mean). At inference
    ``z̃ = (z - μ̄) W`` and ``M(x, c) = ||z̃||² - 2 z̃·μ̃_c + ||μ̃_c||²``: one ``(n × r)·(r × C)``
    product for all classes (clamped at 0). A singular covariance (numerical rank ``r < d``)
    triggers a ``UserWarning`` naming the layer and its pseudo-inverse is used (``W`` keeps
    the ``r`` non-null directions), so the score still ranks inputs. A non-finite
    covariance (e.g. a single calibration sample) also warns and gives ``-inf`` conformities.

    Mahalanobis++ (Mueller & Hein, "Mahalanobis++: Improving OOD Detection via Feature
    Normalization", ICML 2025): with ``normalize=True`` each layer's (flattened,
    ``act_norm``-normalised) features are divided by their L2 norm before the Gaussian fit
    and at inference, so that the feature norms, which vary strongly across classes and
    inputs, no longer dominate the distance (``act_norm``, one positive factor per layer and
    sample, then has no effect).

    Args:
        epsilon: input perturbation magnitude (0 = none).
        fgm_norm: norm of the perturbation step (``>= 1``; ``inf`` = sign of the gradient).
        weights: one weight per recorded layer (default: all ones).
        normalize: extension: L2-normalise each layer's features (Mahalanobis++; default
            ``False``, the reference's plain features). Changing it unfits the score.
        max_batch: with ``epsilon != 0``, rows per gradient pass (``None``: the whole batch
            at once); bounds the autograd memory whatever the caller's batch size, results
            do not depend on it (up to float rounding). ``repr`` shows it only when not the
            default.

    Changing ``epsilon``, ``fgm_norm``, ``weights`` or ``max_batch`` keeps the score fit.
    ``fgm_norm`` is checked at fit and, when ``epsilon != 0``, at inference (the reference
    checked the previous value on assignment); a ``weights`` length that differs from the
    number of recorded layers raises ``ValueError`` at inference.

    Cost: calibration memory ``O(C·d + d²)`` per layer (float64; batches are converted to
    float64 by chunks of ``2**24`` elements, so ``n`` never enters), one ``d × d``
    eigen-decomposition per layer at the end. Before allocating, a layer whose float64
    statistics would exceed the device's memory raises ``MemoryError`` (above 2 GiB: a
    ``UserWarning``), naming the layer, its flattened size, the estimate and the fix.
    Inference: per layer one ``(n × d)·(d × r)`` and one ``(n × r)·(r × C)`` product
    (float32, float64 for float64 inputs); no extra forward pass when ``epsilon == 0``,
    otherwise, per chunk of ``max_batch`` inputs, one forward building the graph (it also
    gives ``out``), then per recorded layer one backward to the inputs only (parameters
    frozen meanwhile, every ``requires_grad`` flag restored) and one forward on the perturbed
    inputs; peak memory is the autograd state of one chunk. Fitted state (float64,
    per layer): ``means`` (NaN rows for absent classes), ``center`` (``μ̄``), ``whitening``
    (``W``) and ``means_white`` (``μ̃``).
    """

    epsilon: float = 0.0
    fgm_norm: float = math.inf
    weights: Sequence[float] | None = None
    max_batch: int | None = DEFAULT_MAX_BATCH
    # shadows BaseScore.normalize (the act_norm helper), reached here as _features
    normalize: bool = False  # type: ignore[assignment]

    _extension_params = BaseScoreClassif._extension_params | {"max_batch", "normalize"}

    #: Relative variant (Ren et al.): subtract the distance to a background Gaussian.
    _relative: ClassVar[bool] = False

    _fitted_attrs: ClassVar[tuple[str, ...]] = ("means", "center", "whitening", "means_white")

    _param_ranges = param_ranges(
        epsilon=ParamRange(math.isfinite, "a finite number"),
        fgm_norm=ParamRange.interval(1, low_open=False),
    )

    # -- parameters ---------------------------------------------------------------------------

    _keeps_fit = _INFERENCE_PARAMS

    @property
    def _inference_needs_grad(self) -> bool:
        return self.epsilon != 0

    def _features(self, activations: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Raw recorded activations -> the features modelled: ``act_norm`` applied, then,
        with ``normalize``, each layer flattened and divided by its per-sample L2 norm."""
        features = BaseScore.normalize(self, activations)
        if not self.normalize:
            return features
        return tuple(normalize_samples(f.reshape(f.shape[0], -1), ord=2) for f in features)

    def activations(self, *, concatenate: bool = False) -> tuple[Tensor, ...]:
        """Features of the latest recorder forward, as modelled (see :meth:`_features`;
        without ``normalize``, :meth:`BaseScore.activations`)."""
        raw = tuple(self.rnet.activations.values())
        if not self.normalize:
            return BaseScore.normalize(self, raw, concatenate=concatenate)
        features = self._features(raw)
        return (torch.cat(features, dim=1),) if concatenate else features

    # -- public static helpers (the reference's API) -----------------------------------------
    compute_mahalanobis = staticmethod(mahalanobis_distances)
    compute_precision = staticmethod(precision_matrix)

    # -- calibration --------------------------------------------------------------------------
    def _calib_update(self, batch: CalibBatch) -> None:
        out = batch.out
        n_classes = out.shape[1]
        labels = validate_labels(batch.labels, len(batch), n_classes)
        features = self._features(batch.activations)
        state = self._state
        self._layer_ids = tuple(self.rnet.activations.keys()) or tuple(self.rnet.recording)
        for layer, feats in enumerate(features):
            flat = feats.reshape(len(feats), -1)
            if f"outer{layer}" not in state:  # first batch: refuse or warn before allocating
                check_covariance_memory(
                    type(self).__name__,
                    self._layer_name(layer),
                    feats,
                    flat.device,
                    n_covariances=2 if self._relative else 1,
                )
            d = flat.shape[1]
            ids = labels.to(flat.device)
            if layer == 0:
                state.add("count", torch.bincount(ids, minlength=n_classes).to(_F64))
            step = max(1, _CHUNK_ELEMENTS // max(d, 1))  # bounded float64 copy of the batch
            for start in range(0, len(flat), step):
                x = flat[start : start + step].to(_F64)
                sums = x.new_zeros((n_classes, d)).index_add_(0, ids[start : start + step], x)
                state.add(f"sum{layer}", sums)
                state.add(f"outer{layer}", x.T @ x)

    def _layer_name(self, layer: int) -> str:
        ids = self.__dict__.get("_layer_ids", ())
        if len(ids) > layer:
            return f"{ids[layer]} (recorded layer #{layer} in firing order)"
        return f"#{layer} in firing order"

    def _calib_end(self) -> None:
        state = self._state
        counts = state.sum("count")
        n_total = float(counts.sum())
        present = counts > 0
        means, centers, whitenings, means_white, backgrounds = [], [], [], [], []
        layer = 0
        while f"sum{layer}" in state:
            name = self._layer_name(layer)
            sums, outer = state.sum(f"sum{layer}"), state.sum(f"outer{layer}")
            class_means = sums / counts[:, None]  # NaN rows for absent classes
            center = sums.sum(dim=0) / n_total
            # Within-class scatter: Σ z zᵀ - Σ_c n_c μ_c μ_cᵀ (= Σ_c S_c/√n_c (S_c/√n_c)ᵀ).
            scaled = sums[present] / counts[present].sqrt()[:, None]
            diagonal = outer.diagonal()
            raw_scale = float(diagonal.max()) / max(n_total - 1.0, 1.0) if len(diagonal) else 0.0
            cov = (outer - scaled.T @ scaled) / (n_total - 1)
            whitening = whitening_matrix(cov, raw_scale, f"covariance matrix at layer {name}")
            means.append(class_means)
            centers.append(center)
            whitenings.append(whitening)
            means_white.append((class_means - center) @ whitening)
            if self._relative:
                background_cov = (outer - n_total * torch.outer(center, center)) / (n_total - 1)
                where = f"background covariance matrix at layer {name}"
                backgrounds.append(whitening_matrix(background_cov, raw_scale, where))
            layer += 1
        self.__dict__.pop("_layer_ids", None)
        self.means: tuple[Tensor, ...] = tuple(means)
        self.center: tuple[Tensor, ...] = tuple(centers)
        self.whitening: tuple[Tensor, ...] = tuple(whitenings)
        self.means_white: tuple[Tensor, ...] = tuple(means_white)
        if self._relative:
            self.background_whitening: tuple[Tensor, ...] = tuple(backgrounds)

    @property
    def precisions(self) -> tuple[Tensor, ...]:
        """Per layer, the precision matrix used (``W Wᵀ``: inverse or pseudo-inverse)."""
        return tuple(w @ w.T for w in self.whitening)

    # -- inference ----------------------------------------------------------------------------
    def _background_d2(self, layer: int, z: Tensor) -> Tensor:
        """Squared distance to the background Gaussian (relative variant), ``(n,)``."""
        whitening = self.background_whitening[layer].to(z)
        return ((z - self.center[layer].to(z)) @ whitening).square().sum(dim=1)

    def _class_d2(self, layer: int, z: Tensor) -> Tensor:
        """Distances of features ``z`` ``(n, d)`` (compute dtype) to every class, ``(n, C)``."""
        whitening = self.whitening[layer].to(z)
        means_white = self.means_white[layer].to(z)
        z_white = (z - self.center[layer].to(z)) @ whitening
        d2 = (
            z_white.square().sum(dim=1, keepdim=True)
            - 2 * (z_white @ means_white.T)
            + means_white.square().sum(dim=1)
        ).clamp(min=0)
        if self._relative:
            d2 = d2 - self._background_d2(layer, z)[:, None]
        return d2

    def _candidate_d2(self, layer: int, z: Tensor, candidates: Tensor) -> Tensor:
        """Distance of each sample to its own candidate class, ``(n,)`` (differentiable)."""
        whitening = self.whitening[layer].to(z)
        means_white = self.means_white[layer].to(z)[candidates]
        z_white = (z - self.center[layer].to(z)) @ whitening
        d2 = (z_white - means_white).square().sum(dim=1)
        if self._relative:
            d2 = d2 - self._background_d2(layer, z)
        return d2

    def _weights(self, n_layers: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.weights is None:
            return torch.ones(n_layers, dtype=dtype, device=device)
        weights = torch.as_tensor(self.weights, dtype=dtype, device=device).reshape(-1)
        if len(weights) != n_layers:
            msg = (
                f"`weights` must have one value per recorded layer ({n_layers}) "
                f"(got {len(weights)})"
            )
            raise ValueError(msg)
        return weights

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        if self.epsilon == 0:
            out = self.rnet(inputs)
            # float64 work for float64 inputs (a dict batch: for a float64 network)
            cdtype = compute_dtype(inputs.dtype if isinstance(inputs, Tensor) else out.dtype)
            features = self._features(tuple(self.rnet.activations.values()))
            d2 = [
                self._class_d2(layer, feats.reshape(feats.shape[0], -1).to(cdtype))
                for layer, feats in enumerate(features)
            ]
        else:
            cdtype = compute_dtype(inputs.dtype)
            out, d2 = self._perturbed_d2(inputs, cdtype)
        stacked = torch.stack(d2, dim=-1)  # (n, C, L)
        weights = self._weights(stacked.shape[-1], cdtype, stacked.device)
        conformity = -(stacked @ weights)
        conformity = conformity.masked_fill(conformity.isnan(), -math.inf)
        return out, conformity.to(out.dtype)

    def _perturbed_d2(self, inputs: Tensor, cdtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
        check(self.fgm_norm >= 1)
        chunk = functools.partial(self._perturbed_chunk, cdtype=cdtype)
        with frozen_parameters(self.rnet.net):
            out, *d2 = by_chunks(chunk, inputs, self.max_batch)
        return out, d2

    def _perturbed_chunk(self, inputs: Tensor, cdtype: torch.dtype) -> tuple[Tensor, ...]:
        """``(out, d2 of layer 0, d2 of layer 1, ...)`` on perturbed copies of one chunk."""
        x = inputs.detach().requires_grad_()  # alias: the caller's tensor is left untouched
        out = self.rnet(x)
        layer_ids = tuple(self.rnet.activations.keys())
        features = self._features(tuple(self.rnet.activations.values()))
        d2 = []
        for layer, feats in enumerate(features):
            z = feats.reshape(len(feats), -1).to(cdtype)
            with torch.no_grad():
                candidates = self._class_d2(layer, z).nan_to_num(nan=math.inf).argmin(dim=1)
            objective = -self._candidate_d2(layer, z, candidates)
            grad = batched_grad(objective, x, retain_graph=True)
            if not bool(grad.isfinite().all()):
                grad = _rescaled_grad(objective, z, x)
            x_adv = x.detach()
            try:
                x_adv = x_adv + self.epsilon * fgm_direction(grad, p=self.fgm_norm)
            except ValueError as exc:
                warnings.warn(
                    "Error during the computation of adversarial perturbation at layer "
                    f"{layer_ids[layer] if layer < len(layer_ids) else layer} ({exc}). "
                    "Continuing without adversarial reinforcement",
                    UserWarning,
                    stacklevel=7,
                )
            with torch.no_grad():
                self.rnet(x_adv)
                adv_feats = self._features(tuple(self.rnet.activations.values()))[layer]
                d2.append(self._class_d2(layer, adv_feats.reshape(len(adv_feats), -1).to(cdtype)))
        return (out.detach(), *d2)
