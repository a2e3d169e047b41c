"""Confidence scores: calibrate on in-distribution data, then ``score(x) -> (out, conformity)``."""

from scio.scores import utils
from scio.scores.base import BaseScore
from scio.scores.classification import (
    JTLA,
    KNN,
    LID,
    ODIN,
    BaselineClassif,
    BaseScoreClassif,
    DeepMahalanobis,
    DkNN,
    Energy,
    FeatureSqueezing,
    GradNorm,
    Gram,
    IsoMax,
    JointEnergy,
    Logit,
    Odds,
    ReAct,
    RelativeMahalanobis,
    Softmax,
    Trust,
)
from scio.scores.inference import JointInference, infer_jointly
from scio.scores.joint import fit_jointly

__all__ = [
    "JTLA",
    "KNN",
    "LID",
    "ODIN",
    "BaseScore",
    "BaseScoreClassif",
    "BaselineClassif",
    "DeepMahalanobis",
    "DkNN",
    "Energy",
    "FeatureSqueezing",
    "GradNorm",
    "Gram",
    "IsoMax",
    "JointEnergy",
    "JointInference",
    "Logit",
    "Odds",
    "ReAct",
    "RelativeMahalanobis",
    "Softmax",
    "Trust",
    "fit_jointly",
    "infer_jointly",
    "utils",
]
