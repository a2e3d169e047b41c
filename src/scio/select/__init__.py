"""Validated selection: tune hyper-parameters and choose scores on held-out data, honestly.

``tune`` searches a score's grid, ``choose`` several scores' grids, both on an
in-distribution validation split and a validation OoD set that must differ from every test
OoD set (OpenOOD v1.5's protocol, see ``docs/selection.md``). The whole search costs one
recorded forward per calibration batch and one per validation batch (grid points share the
recorded activations); scores taking input gradients run the passes each grid point needs.
"""

from scio.select.choose import ChoiceResult, choose
from scio.select.combine import RankAverage, reference_ranks
from scio.select.grid import Grid, expand_grid, make_candidates
from scio.select.metric import METRICS
from scio.select.result import ResultTable, TuneResult
from scio.select.tune import tune

__all__ = [
    "METRICS",
    "ChoiceResult",
    "Grid",
    "RankAverage",
    "ResultTable",
    "TuneResult",
    "choose",
    "expand_grid",
    "make_candidates",
    "reference_ranks",
    "tune",
]
