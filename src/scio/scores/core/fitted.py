"""The check of objects built on several fitted scores (joint inference, conformal
detectors)."""

from __future__ import annotations

from collections.abc import Iterable

from scio.scores.core.base import BaseScore

__all__ = ["fitted_scores"]


def fitted_scores(
    scores: BaseScore | Iterable[BaseScore], *, unfit_error: type[Exception], hint: str
) -> list[BaseScore]:
    """``scores`` as a non-empty list of fitted scio scores.

    Raises:
        ValueError: no score.
        TypeError: an entry is not a scio score (named by its position).
        unfit_error: an entry is not fitted; the message names it and ends with ``hint``.
    """
    listed = [scores] if isinstance(scores, BaseScore) else list(scores)
    if not listed:
        msg = "`scores` must hold at least one fitted score (got none)"
        raise ValueError(msg)
    for i, score in enumerate(listed):
        if not isinstance(score, BaseScore):
            msg = f"`scores[{i}]` must be a scio score (got {type(score).__name__})"
            raise TypeError(msg)
        if not score.is_fit:
            msg = f"`scores[{i}]` ({type(score).__name__}) is not fitted: {hint}"
            raise unfit_error(msg)
    return listed
