"""ReweightOOD: Mahalanobis distance of unit features to the closest class mean."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from scio.scores.classification.deepmahalanobis import DeepMahalanobis

__all__ = ["ReweightOOD"]


class ReweightOOD(DeepMahalanobis):
    """ReweightOOD's detector (Regmi et al., "ReweightOOD: Loss Reweighting for
    Distance-based OOD Detection", CVPR Workshops 2024; OpenOOD's ``reweightood``
    postprocessor).

    Idea: ReweightOOD trains a network whose L2-normalised penultimate features form
    compact, well separated classes (a reweighted contrastive loss); its detector is the
    Mahalanobis distance of those unit features to the closest class mean under a shared
    covariance. The detector applies to any network (it is :class:`DeepMahalanobis` with
    ``normalize=True``, read out at the closest class).

    Formula: with ``z`` the features (recorded layers, ``act_norm`` applied, each layer
    flattened and divided by its L2 norm), class means ``μ_c`` and the precision ``P`` of
    the pooled within-class covariance (labels needed),
    ``conformity = max_c -Σ_l w_l (z - μ_c)ᵀ P (z - μ_c)``, identical for every class
    (classes absent from calibration are ignored; ``-inf`` if none is present). OpenOOD
    normalises its covariance by ``N`` rather than ``N - 1``: a constant factor, the same
    ranking.

    Args:
        normalize: L2-normalise each layer's features (default ``True``, ReweightOOD's;
            ``False`` gives the closest-class read-out of :class:`DeepMahalanobis`).
        epsilon, fgm_norm, weights, max_batch: as :class:`DeepMahalanobis` (defaults: no
            input perturbation, all layers weighted 1).

    Cost: as :class:`DeepMahalanobis` (one forward and two products per layer at
    inference), plus a max over the classes.
    """

    normalize: bool = True

    _fitted_attrs: ClassVar[tuple[str, ...]] = DeepMahalanobis._fitted_attrs

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out, conformity = super().get_conformity(inputs)
        return out, conformity.amax(dim=1)
