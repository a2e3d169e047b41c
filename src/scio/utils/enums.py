"""String enums used for hyper-parameters, with explicit error messages.

Every enum is a ``(str, Enum)`` enum, as in the reference (``IndexMetric.L2 == "l2"``,
``str(IndexMetric.L2) == "IndexMetric.L2"``, ``repr`` ``<IndexMetric.L2: 'l2'>``), and every
``XLike`` alias accepts either a member or its string value. An invalid value raises
``ValueError("'x' is not a valid IndexMetric. Supported: 'ip', 'l2'")`` (the enum's
``__qualname__``).
"""

from __future__ import annotations

import inspect
from enum import Enum, unique
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


class EnumWithExplicitSupport(Enum):
    """Enum whose invalid-value error lists the supported values (mix in ``str`` first)."""

    __slots__ = ()

    @classmethod
    def _missing_(cls, value: object) -> Any:
        supported = ", ".join(sorted(repr(member.value) for member in cls))
        msg = f"{value!r} is not a valid {cls.__qualname__}. Supported: {supported}"
        raise ValueError(msg)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("value", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        )


@unique
class InterpolationKind(str, EnumWithExplicitSupport):
    """How a ROC curve is interpolated between its Pareto points."""

    CONVEX_HULL = "convex_hull"
    PESSIMISTIC = "pessimistic"


@unique
class ScoreClassifMode(str, EnumWithExplicitSupport):
    """Post-processing of per-class conformities."""

    DIFF = "diff"
    RATIO = "ratio"
    RAW = "raw"


@unique
class LabelKind(str, EnumWithExplicitSupport):
    """Which labels a score calibrates with: predicted or ground truth."""

    PRED = "pred"
    TRUE = "true"


@unique
class ClassAggr(str, EnumWithExplicitSupport):
    """Class aggregation of JTLA."""

    ADV = "adv"
    NAT = "nat"


@unique
class ZAggr(str, EnumWithExplicitSupport):
    """z-score aggregation of Odds."""

    DETECT = "detect"
    RECTIFY = "rectify"
    SUM = "sum"


@unique
class IndexMetric(str, EnumWithExplicitSupport):
    """Nearest-neighbour metric: squared L2 distance or inner product."""

    IP = "ip"
    L2 = "l2"


@unique
class AggrName(str, EnumWithExplicitSupport):
    """Named aggregators (see :func:`scio.scores.utils.get_aggregator`)."""

    FISHER = "fisher"
    GEOMETRIC = "geometric"
    HARMONIC = "harmonic"
    MAX = "max"
    MEAN = "mean"
    MIN = "min"
    PROD = "prod"
    SUM = "sum"


@unique
class MultinomialTestMode(str, EnumWithExplicitSupport):
    """Statistical test of JTLA's multinomial model."""

    DCM = "dcm"
    MAP = "map"
    MLE = "mle"


@unique
class ScoreTimerOperation(str, EnumWithExplicitSupport):
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
