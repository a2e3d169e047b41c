"""String enums used for hyper-parameters, with explicit error messages.

Every enum is a ``str`` enum (``IndexMetric.L2 == "l2"``) and every ``XLike`` alias accepts
either a member or its string value. An invalid value raises
``ValueError("'x' is not a valid IndexMetric. Supported: 'ip', 'l2'")``.
"""

from __future__ import annotations

import inspect
from enum import StrEnum
from typing import Any, Literal

__all__ = [
    "AggrName",
    "AggrNameLike",
    "ClassAggr",
    "ClassAggrLike",
    "EnumWithExplicitSupport",
    "IndexMetric",
    "IndexMetricLike",
    "InterpolationKind",
    "InterpolationKindLike",
    "LabelKind",
    "LabelKindLike",
    "MultinomialTestMode",
    "MultinomialTestModeLike",
    "ScoreClassifMode",
    "ScoreClassifModeLike",
    "ScoreTimerOperation",
    "ScoreTimerOperationLike",
    "ZAggr",
    "ZAggrLike",
]


class EnumWithExplicitSupport(StrEnum):
    """``str`` enum whose invalid-value error lists the supported values."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        supported = ", ".join(sorted(repr(member.value) for member in cls))
        msg = f"{value!r} is not a valid {cls.__name__}. Supported: {supported}"
        raise ValueError(msg)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("value", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        )


class InterpolationKind(EnumWithExplicitSupport):
    """How a ROC curve is interpolated between its Pareto points."""

    CONVEX_HULL = "convex_hull"
    PESSIMISTIC = "pessimistic"


class ScoreClassifMode(EnumWithExplicitSupport):
    """Post-processing of per-class conformities."""

    DIFF = "diff"
    RATIO = "ratio"
    RAW = "raw"


class LabelKind(EnumWithExplicitSupport):
    """Which labels a score calibrates with: predicted or ground truth."""

    PRED = "pred"
    TRUE = "true"


class ClassAggr(EnumWithExplicitSupport):
    """Class aggregation of JTLA."""

    ADV = "adv"
    NAT = "nat"


class ZAggr(EnumWithExplicitSupport):
    """z-score aggregation of Odds."""

    DETECT = "detect"
    RECTIFY = "rectify"
    SUM = "sum"


class IndexMetric(EnumWithExplicitSupport):
    """Nearest-neighbour metric: squared L2 distance or inner product."""

    IP = "ip"
    L2 = "l2"


class AggrName(EnumWithExplicitSupport):
    """Named aggregators (see :func:`scio.scores.utils.get_aggregator`)."""

    FISHER = "fisher"
    GEOMETRIC = "geometric"
    HARMONIC = "harmonic"
    MAX = "max"
    MEAN = "mean"
    MIN = "min"
    PROD = "prod"
    SUM = "sum"


class MultinomialTestMode(EnumWithExplicitSupport):
    """Statistical test of JTLA's multinomial model."""

    DCM = "dcm"
    MAP = "map"
    MLE = "mle"


class ScoreTimerOperation(EnumWithExplicitSupport):
    """Operations timed by :class:`scio.utils.ScoreTimer`."""

    CALIBRATION = "calibration"
    INFERENCE = "inference"


InterpolationKindLike = InterpolationKind | Literal["convex_hull", "pessimistic"]
ScoreClassifModeLike = ScoreClassifMode | Literal["diff", "ratio", "raw"]
LabelKindLike = LabelKind | Literal["pred", "true"]
ClassAggrLike = ClassAggr | Literal["adv", "nat"]
ZAggrLike = ZAggr | Literal["detect", "rectify", "sum"]
IndexMetricLike = IndexMetric | Literal["ip", "l2"]
AggrNameLike = (
    AggrName | Literal["fisher", "geometric", "harmonic", "max", "mean", "min", "prod", "sum"]
)
MultinomialTestModeLike = MultinomialTestMode | Literal["dcm", "map", "mle"]
ScoreTimerOperationLike = ScoreTimerOperation | Literal["calibration", "inference"]
