"""Confidence scores: calibrate on in-distribution data, then ``score(x) -> (out, conformity)``."""

from scio.scores import utils
from scio.scores.base import BaseScore
from scio.scores.classification import KNN, BaseScoreClassif
from scio.scores.joint import fit_jointly

__all__ = ["KNN", "BaseScore", "BaseScoreClassif", "fit_jointly", "utils"]
