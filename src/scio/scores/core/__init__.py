"""The score life cycle shared by every algorithm: base classes, the fit session and the
mergeable calibration state, input validation, timers' owners, the classifier-head mixin,
shaped read-outs, chunked input gradients and the distributed merge."""

from scio.scores.core.base import BaseScore, NoCalibration, ParamError, StreamingCalibration
from scio.scores.core.calibration import CalibBatch, CalibState, as_batches
from scio.scores.core.session import FitSession

__all__ = [
    "BaseScore",
    "CalibBatch",
    "CalibState",
    "FitSession",
    "NoCalibration",
    "ParamError",
    "StreamingCalibration",
    "as_batches",
]
