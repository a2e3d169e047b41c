"""RelativeMahalanobis: Mahalanobis distance minus the distance to a background Gaussian."""

from __future__ import annotations

from typing import ClassVar

from scio.scores.classification.deepmahalanobis import DeepMahalanobis

__all__ = ["RelativeMahalanobis"]


class RelativeMahalanobis(DeepMahalanobis):
    """Relative Mahalanobis distance (Ren et al., "A Simple Fix to Mahalanobis Distance for
    Improving Near-OOD Detection", ICML UDL workshop 2021).

    Idea: the class-conditional Mahalanobis distance of :class:`DeepMahalanobis` is
    dominated by feature directions that are uninformative for the classes. Subtracting the
    distance to a single "background" Gaussian fitted on all calibration features (global
    mean ``μ₀``, covariance of ``z - μ₀``) cancels those directions.

    Formula: per layer, ``RM_l(x, c) = M(z, μ_c, P) - M(z, μ₀, P₀)`` with ``M``, ``μ_c`` and
    ``P`` as in :class:`DeepMahalanobis` and ``P₀`` the inverse of the (unbiased) covariance
    of ``z - μ₀``; ``conformity_c = -Σ_l w_l RM_l(x, c)`` (``-inf`` for absent classes).
    ``epsilon != 0`` perturbs the input along ``∇_x(-RM_l(x, ĉ))`` as in
    :class:`DeepMahalanobis`.

    Args:
        epsilon: input perturbation magnitude (0 = none).
        fgm_norm: norm of the perturbation step (``>= 1``).
        weights: one weight per recorded layer (default: all ones).
        normalize: extension: L2-normalise each layer's features before both Gaussian fits
            and at inference (Mahalanobis++, see :class:`DeepMahalanobis`; default ``False``).

    Changing ``epsilon``, ``fgm_norm`` or ``weights`` keeps the score fit. The caller's input
    tensor is never modified.

    Cost: as :class:`DeepMahalanobis` (the background statistics come from the same running
    sums), plus one ``d × d`` eigen-decomposition per layer at calibration and one
    ``(n × d)·(d × d)`` product per layer at inference.
    """

    _relative: ClassVar[bool] = True

    _fitted_attrs: ClassVar[tuple[str, ...]] = (
        *DeepMahalanobis._fitted_attrs,
        "background_whitening",
    )
