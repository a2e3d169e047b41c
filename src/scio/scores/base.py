"""Reference import path of :class:`BaseScore` (it lives in :mod:`scio.scores.core.base`)."""

from scio.scores.core.base import BaseScore, NoCalibration, ParamError, StreamingCalibration

__all__ = ["BaseScore", "NoCalibration", "ParamError", "StreamingCalibration"]
