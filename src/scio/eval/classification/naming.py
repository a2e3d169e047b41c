"""Display names of scores and OoD sets, shared by the progress bars, tables and plots."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TypeAlias

from scio.recorder import DepthIdx
from scio.scores import BaseScoreClassif
from scio.utils.misc import check

__all__ = ["IND_TITLE", "ScoreClassifAndLayers"]

#: A score and the layers it records, as given to :func:`~scio.eval.fit_scores`.
ScoreClassifAndLayers: TypeAlias = tuple[BaseScoreClassif, Collection[DepthIdx]]

#: Name of the in-distribution set in legends and progress bars.
IND_TITLE = "In-Distribution"


def _score_and_layers_str(score_and_layers: ScoreClassifAndLayers | str | None) -> str:
    """``str(score)``, plus ``"\\n↳ "`` and the recorded layers when there are some; a string
    label is returned as it is (as in the reference)."""
    if score_and_layers is None:
        return ""
    if isinstance(score_and_layers, str):
        return score_and_layers
    score, layers = score_and_layers
    text = str(score)
    if layers:
        text += "\n↳ " + ", ".join(map(str, layers))
    return text


def _score_names(
    scores_and_layers: Sequence[ScoreClassifAndLayers | str] | None, n_scores: int
) -> list[str]:
    """One display name per score: its pair string, or ``"Score i"`` (1-based)."""
    if scores_and_layers is None:
        return [f"Score {i}" for i in range(1, n_scores + 1)]
    check(
        len(scores_and_layers) == n_scores,
        "`scores_and_layers` must have one (score, layers) pair or label per row of "
        f"confidences (got {len(scores_and_layers)} for {n_scores} scores)",
    )
    return [_score_and_layers_str(pair) for pair in scores_and_layers]


def _ood_names(oods_title: Sequence[str] | None, n_oods: int) -> list[str]:
    """One display name per OoD set: its title, or ``"OoD i"`` (1-based)."""
    if oods_title is None:
        return [f"OoD {i}" for i in range(1, n_oods + 1)]
    check(
        len(oods_title) == n_oods,
        f"`oods_title` must have one title per OoD set (got {len(oods_title)} for {n_oods})",
    )
    return [str(title) for title in oods_title]
