"""Confidence scores for classifiers (one file per algorithm family)."""

from scio.scores.classification.base import BaseScoreClassif, TemplateClassif
from scio.scores.classification.knn import KNN

__all__ = ["KNN", "BaseScoreClassif", "TemplateClassif"]
