"""Confidence scores for classifiers (one file per algorithm family)."""

from scio.scores.classification.adascale import AdaScale
from scio.scores.classification.ash import ASH
from scio.scores.classification.base import BaseScoreClassif, TemplateClassif
from scio.scores.classification.cfood import CFOOD
from scio.scores.classification.deepmahalanobis import DeepMahalanobis
from scio.scores.classification.dice import DICE
from scio.scores.classification.dknn import DkNN
from scio.scores.classification.energy import Energy
from scio.scores.classification.entropy import Entropy
from scio.scores.classification.fdbd import fDBD
from scio.scores.classification.featuresqueezing import FeatureSqueezing
from scio.scores.classification.gen import GEN
from scio.scores.classification.gmm import GMM
from scio.scores.classification.gradnorm import GradNorm
from scio.scores.classification.gram import Gram
from scio.scores.classification.grood import GROOD
from scio.scores.classification.iodin import IODIN
from scio.scores.classification.isomax import IsoMax
from scio.scores.classification.jointenergy import JointEnergy
from scio.scores.classification.jtla import JTLA, JTLATestMultinomial
from scio.scores.classification.klm import KLM
from scio.scores.classification.knn import KNN
from scio.scores.classification.lid import LID
from scio.scores.classification.logit import Logit
from scio.scores.classification.nci import NCI
from scio.scores.classification.nnguide import NNGuide
from scio.scores.classification.odds import Odds
from scio.scores.classification.odin import ODIN
from scio.scores.classification.openmax import OpenMax
from scio.scores.classification.rankfeat import RankFeat
from scio.scores.classification.react import ReAct
from scio.scores.classification.relation import Relation
from scio.scores.classification.relativemahalanobis import RelativeMahalanobis
from scio.scores.classification.residual import Residual
from scio.scores.classification.reweightood import ReweightOOD
from scio.scores.classification.scale import SCALE
from scio.scores.classification.she import SHE
from scio.scores.classification.softmax import BaselineClassif, Softmax
from scio.scores.classification.trust import Trust
from scio.scores.classification.vim import ViM
from scio.scores.classification.vra import VRA

__all__ = [
    "ASH",
    "CFOOD",
    "DICE",
    "GEN",
    "GMM",
    "GROOD",
    "IODIN",
    "JTLA",
    "KLM",
    "KNN",
    "LID",
    "NCI",
    "ODIN",
    "SCALE",
    "SHE",
    "VRA",
    "AdaScale",
    "BaseScoreClassif",
    "BaselineClassif",
    "DeepMahalanobis",
    "DkNN",
    "Energy",
    "Entropy",
    "FeatureSqueezing",
    "GradNorm",
    "Gram",
    "IsoMax",
    "JTLATestMultinomial",
    "JointEnergy",
    "Logit",
    "NNGuide",
    "Odds",
    "OpenMax",
    "RankFeat",
    "ReAct",
    "Relation",
    "RelativeMahalanobis",
    "Residual",
    "ReweightOOD",
    "Softmax",
    "TemplateClassif",
    "Trust",
    "ViM",
    "fDBD",
]
