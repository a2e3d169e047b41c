"""The structural types the fit machinery needs of a score and of its session.

The fit session and the distributed merge drive a score through these attributes only; they
are typed against these protocols (not against ``BaseScore``), so that the base class can
import them without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from scio.recorder import Recorder
    from scio.scores.core.calibration import CalibBatch
    from scio.utils.misc import ScoreTimer

__all__ = ["FittableScore", "SessionLike"]


class FittableScore(Protocol):
    """What :class:`~scio.scores.core.session.FitSession` and the distributed merge use of a
    score (every :class:`~scio.scores.core.base.BaseScore` is one)."""

    _rnet: Any
    _is_fit: bool
    _fit_input_shape: tuple[int, ...] | None
    _fit_input_dtype: torch.dtype | None
    _fit_n_samples: int
    _calib_buffer: list[tuple[torch.Tensor, Any]]
    _state: Any

    @property
    def rnet(self) -> Recorder: ...

    @property
    def params(self) -> dict[str, Any]: ...

    @property
    def timer(self) -> ScoreTimer: ...

    @property
    def _calib_needs_grad(self) -> bool: ...

    def unfit(self) -> None: ...

    def calibrate(self, calib_data: Any, calib_labels: Any) -> None: ...

    def _check_params(self, n_calib: int) -> None: ...

    def _score_input(self, inputs: Any, name: str = ...) -> Any: ...

    def _calib_start(self) -> None: ...

    def _calib_update(self, batch: CalibBatch) -> None: ...

    def _calib_end(self) -> None: ...


class SessionLike(Protocol):
    """What the distributed merge uses of a fit session."""

    n_samples: int
    input_shape: tuple[int, ...] | None
    input_dtype: torch.dtype | None
    _prepared: bool

    def prepare(self, probe: torch.Tensor) -> None: ...
