"""``scio bench --tune``: tune every method on validation data, report tuned vs default.

Each method with an OpenOOD ``postprocessor_sweep`` (``configs/postprocessors/<name>.yml``
of github.com/Jingkang50/OpenOOD, "APS" mode) is tuned on that grid — written in scio's
parameter names, adaptations listed in :data:`OPENOOD_SWEEPS` — on the protocol's
validation data (:mod:`scio.bench.validation`: an ID slice disjoint from calibration and
test, and a validation OoD set that is none of the test OoD sets). Then:

* the tuned parameters of each method are evaluated once on the test sets (a method whose
  chosen parameters are its defaults keeps its default results: same computation);
* :func:`scio.select.choose` picks one method on validation AUROC (methods without a sweep
  compete with their default parameters) and builds the rank average of the three best
  (:class:`scio.select.RankAverage`), whose test AUROC is then measured.

All grid points of all methods share one forward per calibration batch and one per
validation batch; only input-gradient methods (ODIN, IODIN) run their own passes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console

from scio.bench.protocols import PROTOCOLS
from scio.bench.result import BenchResult
from scio.bench.runner import _METRICS, SCORE_FACTORIES, run_benchmark
from scio.bench.validation import validation_data
from scio.eval import compute_confidence, compute_metrics
from scio.scores import BaseScoreClassif
from scio.select import ChoiceResult, choose, expand_grid

__all__ = ["NOT_SWEPT", "OPENOOD_SWEEPS", "MethodTuning", "TunedResult", "run_tuned"]

_PERCENTILES = [65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0]
_TEMPERATURES = [1.0, 10.0, 100.0, 1000.0]

#: bench name -> (OpenOOD config, its ``postprocessor_sweep`` in scio's parameter names, how
#: it was adapted).
OPENOOD_SWEEPS: dict[str, tuple[str, dict[str, list[Any]], str]] = {
    "KNN": ("knn.yml", {"k": [50, 100, 200, 500, 1000]}, ""),
    "ReAct": ("react.yml", {"percentile": [85.0, 90.0, 95.0, 99.0]}, ""),
    "ASH": ("ash.yml", {"percentile": _PERCENTILES}, ""),
    "SCALE": ("scale.yml", {"percentile": _PERCENTILES}, ""),
    "ODIN": (
        "odin.yml",
        {"temperature": _TEMPERATURES, "epsilon": [0.0014, 0.0028]},
        "OpenOOD's noise is scio's epsilon",
    ),
    "IODIN": ("iodin.yml", {"temperature": _TEMPERATURES, "noise": [0.0014, 0.0028]}, ""),
    "Energy": ("ebo.yml", {"temperature": [1.0]}, ""),
    "GEN": (
        "gen.yml",
        {"gamma": [0.01, 0.1, 0.5], "M": [None]},
        "gamma in {1, 2, 5, 10} dropped (scio's GEN needs 0 < gamma < 1); every M in "
        "{10, ..., 1000} is at least the number of classes, where OpenOOD's top-M slice keeps "
        "every class: scio's M=None",
    ),
    "NCI": ("nci.yml", {"alpha": [0.0001, 0.001, 0.01, 0.1]}, ""),
    "Gram": ("gram.yml", {"max_gram_order": [5]}, "powers [1..5] is max_gram_order=5"),
    "VRA": (
        "vra.yml",
        {"percentile_high": [85.0, 90.0, 95.0, 99.0], "percentile_low": [1.0, 5.0, 10.0, 15.0]},
        "",
    ),
    "Relation": ("relation.yml", {"pow": [1.0, 2.0, 4.0, 6.0, 8.0]}, ""),
}

#: Methods whose OpenOOD config has a sweep that is not run here, and why.
NOT_SWEPT: dict[str, str] = {
    "ViM": "vim.yml sweeps dim in {256, 1000}: not below the 128-d features",
    "fDBD": "fdbd.yml sweeps distance_as_normalizer; scio's fDBD always normalises",
    "GROOD": "grood.yaml sweeps 1,800 combinations",
    "AdaScale-a": "adascale_a.yml sweeps 36 percentile pairs, each with its own "
    "input-gradient calibration pass: far over the time budget",
    "AdaScale-l": "adascale_l.yml: as AdaScale-a",
}


@dataclass
class MethodTuning:
    """How one method was tuned."""

    source: str  # the OpenOOD config ("" when OpenOOD has no sweep run here)
    points: list[dict[str, Any]]  # the grid points searched ([] when none)
    params: dict[str, Any] = field(default_factory=dict)  # chosen (the grid's parameters)
    val_auroc: float = float("nan")  # validation AUROC of the chosen (or default) parameters
    changed: bool = False  # the chosen parameters differ from the bench's defaults
    note: str = ""

    @property
    def searched(self) -> bool:
        """Whether a grid was searched (else the default competes as it is)."""
        return bool(self.points)


@dataclass
class TunedResult:
    """Default and tuned results of one protocol."""

    default: BenchResult
    validation: str
    tuning: list[MethodTuning]  # aligned with default.names
    evals: np.ndarray  # tuned (n_methods, n_oods, n_metrics)
    choice: int  # method chosen on validation (index into default.names)
    combination: list[int] = field(default_factory=list)
    combination_evals: np.ndarray | None = None  # (n_oods, n_metrics)
    combination_val: float = float("nan")
    default_s: float = 0.0  # wall time of the default run
    tune_s: float = 0.0  # wall time added by tuning

    @property
    def combination_name(self) -> str:
        """``"RankAverage(A + B + C)"``."""
        return "RankAverage(" + " + ".join(self.default.names[i] for i in self.combination) + ")"


def _same_params(score: BaseScoreClassif, point: dict[str, Any]) -> bool:
    """Whether ``score``'s parameters already have the values of ``point``."""
    params = score.params
    for key, value in point.items():
        try:
            if not (params[key] == value and (params[key] is None) == (value is None)):
                return False
        except Exception:  # values without a boolean equality
            return False
    return True


def _valid_points(name: str, n_calib: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The points of ``name``'s sweep its score accepts for ``n_calib`` calibration samples
    (the checks ``fit`` runs first, e.g. ``k <= n_calib``), and why the others were not."""
    factory = SCORE_FACTORIES[name][0]
    kept, dropped = [], []
    for point in expand_grid(OPENOOD_SWEEPS[name][1]):
        try:
            score = factory()
            score.set_params(**point)
            score._check_params(n_calib)
        except (AttributeError, TypeError, ValueError) as exc:
            dropped.append(f"{point}: {exc}")
            continue
        kept.append(point)
    return kept, dropped


def _plan(
    names: Sequence[str], fitted: Sequence[BaseScoreClassif], n_calib: int
) -> tuple[list[Any], list[MethodTuning]]:
    """``choose`` candidates (a sweep, or the fitted default as it is) and their records."""
    entries: list[Any] = []
    records: list[MethodTuning] = []
    for name, default in zip(names, fitted):
        if name not in OPENOOD_SWEEPS:
            records.append(MethodTuning("", [], note=NOT_SWEPT.get(name, "")))
            entries.append((default, None))  # evaluated on validation with its default fit
            continue
        source, _, note = OPENOOD_SWEEPS[name]
        points, dropped = _valid_points(name, n_calib)
        notes = [note, *(f"dropped {d}" for d in dropped)]
        if len(points) == 1 and _same_params(default, points[0]):
            notes.append("the sweep is the default")
            points = []
        record = MethodTuning(source, points, note="; ".join(filter(None, notes)))
        records.append(record)
        if points:
            factory, layers = SCORE_FACTORIES[name]
            entries.append((factory(), points, layers))
        else:
            entries.append((default, None))
    return entries, records


def run_tuned(
    protocol: str,
    *,
    scores: Sequence[str] | None = None,
    n_calib: int = 5000,
    n_test: int = 2000,
    n_val: int = 1000,
    batch_size: int = 500,
    seed: int = 0,
    combine: int = 3,
    show_progress: bool = True,
    console: Console | None = None,
) -> TunedResult:
    """The default benchmark of ``protocol``, then every method tuned on validation data.

    Args:
        protocol, scores, n_calib, n_test, batch_size, seed, show_progress, console: as in
            :func:`scio.bench.runner.run_benchmark`.
        n_val: ID validation inputs and validation OoD inputs.
        combine: number of methods in the validated rank average (0: none).
    """
    start = time.perf_counter()
    console = console or Console()
    loaded = PROTOCOLS[protocol](n_calib=n_calib, n_test=n_test, seed=seed)
    fitted: list[BaseScoreClassif] = []
    default = run_benchmark(
        protocol, scores=scores, n_calib=n_calib, n_test=n_test, batch_size=batch_size,
        seed=seed, show_progress=show_progress, console=console, loaded=loaded,
        keep_scores=fitted,
    )  # fmt: skip
    default_s = time.perf_counter() - start
    start = time.perf_counter()
    val = validation_data(protocol, n_test=n_test, n_val=n_val, seed=seed)
    entries, records = _plan(default.names, fitted, len(loaded.calib_data))
    kwargs: dict[str, Any] = {
        "calib_labels": loaded.calib_labels, "metric": "auroc", "batch_size": batch_size,
        "show_progress": show_progress,
    }  # fmt: skip
    args = (loaded.net, loaded.calib_data, val.ind, val.ood)
    try:
        choice = choose(entries, *args, combine=combine, names=default.names, **kwargs)
    except Exception:  # find the failing sweep(s): search them one by one, keep the defaults
        for i, (entry, record) in enumerate(zip(entries, records)):
            if not record.searched:
                continue
            try:
                choose([entry], *args, **kwargs)
            except Exception as exc:  # reported, not fatal
                entries[i] = (fitted[i], None)
                record.points = []
                record.note = "; ".join(filter(None, [record.note, f"sweep failed: {exc}"]))
        choice = choose(entries, *args, combine=combine, names=default.names, **kwargs)
    for record, result, default_score in zip(records, choice.results, fitted):
        record.val_auroc = result.best_value
        if record.searched:
            record.params = result.best_params
            record.changed = not _same_params(default_score, result.best_params)
    test_confs = _tuned_test_confidences(choice, records, loaded, batch_size, show_progress)
    evals = default.evals.copy()
    for i, (_, _, tuned_evals) in test_confs.items():
        evals[i] = tuned_evals
    out = TunedResult(
        default=default,
        validation=val.description,
        tuning=records,
        evals=evals,
        choice=choice.best,
        default_s=default_s,
    )
    if choice.combination is not None and default.confs_ind is not None:
        members = choice.combination_members
        rows_ind = [test_confs[i][0] if i in test_confs else default.confs_ind[i] for i in members]
        rows_oods = [
            [test_confs[i][1][j] if i in test_confs else default.confs_oods[j][i] for i in members]
            for j in range(len(default.oods_title))
        ]
        comb_ind = choice.combination.combine(rows_ind)
        comb_oods = [choice.combination.combine(rows) for rows in rows_oods]
        out.combination = members
        out.combination_evals = _metrics(comb_ind[None], [c[None] for c in comb_oods])[0]
        out.combination_val = float(choice.combination_value or float("nan"))
    out.tune_s = time.perf_counter() - start
    return out


def _metrics(confs_ind: np.ndarray, confs_oods: Sequence[np.ndarray]) -> np.ndarray:
    """The bench's metrics ``(n_scores, n_oods, n_metrics)``; NaN for a score with NaN
    confidences (a tuned configuration may produce some; the run goes on)."""
    evals = np.full((len(confs_ind), len(confs_oods), len(_METRICS)), np.nan)
    for i in range(len(confs_ind)):
        try:
            evals[i] = compute_metrics(confs_ind[i], [ood[i] for ood in confs_oods], _METRICS)[0]
        except ValueError:
            continue
    return evals


def _tuned_test_confidences(
    choice: ChoiceResult,
    records: list[MethodTuning],
    loaded: Any,
    batch_size: int,
    show_progress: bool,
) -> dict[int, tuple[np.ndarray, list[np.ndarray], np.ndarray]]:
    """Test confidences and metrics of every method whose tuned parameters differ from its
    defaults: ``{index: (confs_ind, confs_oods, evals)}`` (one joint evaluation)."""
    changed = [i for i, record in enumerate(records) if record.changed]
    if not changed:
        return {}
    confs_ind, confs_oods = compute_confidence(
        [choice.results[i].score for i in changed], ind=loaded.ind, oods=loaded.oods,
        oods_title=loaded.oods_title, batch_size=batch_size, show_progress=show_progress,
    )  # fmt: skip
    evals = _metrics(confs_ind, confs_oods)
    return {
        i: (confs_ind[k], [ood[k] for ood in confs_oods], evals[k]) for k, i in enumerate(changed)
    }
