"""Outputs of ``scio bench --tune``: console table, report section, ``results.csv`` columns."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from scio.bench.result import METRIC_NAMES
from scio.bench.runner import write_outputs
from scio.bench.tuning import TunedResult
from scio.utils.misc import HEAVY_HEAD_ROUNDED_BOTTOM

__all__ = ["headline", "tuning_markdown", "tuning_table", "write_tuned_outputs"]

#: Columns ``scio bench --tune`` adds to every row of ``results.csv``.
TUNED_COLUMNS = ("tuned_value", "tuned_params", "val_auroc", "grid_points", "validated_choice")
_METRIC_INDEX = {name: m for m, name in enumerate(METRIC_NAMES)}


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in params.items())


def _chosen(result: TunedResult, i: int) -> str:
    record = result.tuning[i]
    if not record.searched:
        return "default"
    return _params(record.params) + ("" if record.changed else " (default)")


def _mean_auroc(evals: np.ndarray) -> np.ndarray:
    return np.asarray(np.mean(evals[..., 0], axis=-1), dtype=np.float64)


def headline(result: TunedResult) -> dict[str, tuple[str, float]]:
    """Mean test AUROC of: the best default and the best tuned method (both picked on the
    test sets: oracles), the method chosen on validation, the validated rank average."""
    names = result.default.names
    default, tuned = _mean_auroc(result.default.evals), _mean_auroc(result.evals)
    lines = {}
    if len(names) and not np.isnan(default).all():
        best = int(np.nanargmax(default))
        lines["best default (oracle: picked on test)"] = (names[best], float(default[best]))
    if len(names) and not np.isnan(tuned).all():
        best = int(np.nanargmax(tuned))
        label = f"{names[best]} ({_chosen(result, best)})"
        lines["best tuned (oracle: picked on test)"] = (label, float(tuned[best]))
    if len(names):
        i = result.choice
        label = f"{names[i]} ({_chosen(result, i)})"
        lines["chosen on validation"] = (label, float(tuned[i]))
    if result.combination_evals is not None:
        value = float(np.mean(result.combination_evals[:, 0]))
        lines["validated rank average"] = (result.combination_name, value)
    return lines


def tuning_table(result: TunedResult) -> Table:
    """Rich table: per method, the sweep, chosen parameters, validation and test AUROC."""
    table = Table(
        title=f"scio bench --tune — {result.default.protocol}-OoD\n{result.validation}",
        box=HEAVY_HEAD_ROUNDED_BOTTOM,
    )
    for column in ("Method", "OpenOOD sweep", "Points", "Chosen parameters", "Val AUROC",
                   "Default AUROC", "Tuned AUROC"):  # fmt: skip
        table.add_column(column, justify="left" if column[0] in "MOC" else "right")
    default, tuned = _mean_auroc(result.default.evals), _mean_auroc(result.evals)
    for i, name in enumerate(result.default.names):
        record = result.tuning[i]
        mark = " ✓" if i == result.choice else ""
        table.add_row(
            name + mark, record.source or "–", str(len(record.points) or "–"),
            _chosen(result, i), _fmt(record.val_auroc), _fmt(default[i]), _fmt(tuned[i]),
        )  # fmt: skip
    if result.combination_evals is not None:
        table.add_row(
            result.combination_name, "–", "–", "top by val AUROC", _fmt(result.combination_val),
            "–", _fmt(float(np.mean(result.combination_evals[:, 0]))),
        )  # fmt: skip
    table.caption = (
        "✓ = chosen on validation. AUROC columns: mean over the test OoD sets. Default run "
        f"{result.default_s:.0f} s, tuning {result.tune_s:.0f} s."
    )
    return table


def tuning_markdown(result: TunedResult) -> str:
    """The report section of one protocol's tuning."""
    default, tuned = _mean_auroc(result.default.evals), _mean_auroc(result.evals)
    lines = [
        f"## {result.default.protocol}-OoD: tuned on validation data",
        "",
        f"{result.validation}. Each method with an OpenOOD `postprocessor_sweep` is tuned on "
        "validation AUROC; the others compete with their defaults. Test numbers: mean AUROC "
        "over the test OoD sets.",
        "",
    ]
    lines += [f"- **{what}**: {label} — {_fmt(value)}" for what, (label, value) in
              headline(result).items()]  # fmt: skip
    lines += [
        "",
        "| method | OpenOOD sweep | points | chosen parameters | val AUROC | default AUROC "
        "| tuned AUROC | Δ |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for i, name in enumerate(result.default.names):
        record = result.tuning[i]
        chosen = " ✓" if i == result.choice else ""
        lines.append(
            f"| {name}{chosen} | {record.source or '–'} | {len(record.points) or '–'} | "
            f"{_chosen(result, i)} | {_fmt(record.val_auroc)} | {_fmt(default[i])} | "
            f"{_fmt(tuned[i])} | {tuned[i] - default[i]:+.3f} |"
        )
    if result.combination_evals is not None:
        value = float(np.mean(result.combination_evals[:, 0]))
        lines.append(
            f"| {result.combination_name} | – | – | top {len(result.combination)} by val "
            f"AUROC | {_fmt(result.combination_val)} | – | {_fmt(value)} | – |"
        )
    notes = [(name, r.note) for name, r in zip(result.default.names, result.tuning) if r.note]
    if notes:
        lines += ["", "Notes on the sweeps:", ""]
        lines += [f"- {name}: {note}" for name, note in notes]
    total = result.default_s + result.tune_s
    lines += [
        "",
        f"Cost: default run {result.default_s:.0f} s, tuning {result.tune_s:.0f} s "
        f"(×{total / max(result.default_s, 1e-9):.2f} the default run).",
    ]
    return "\n".join(lines) + "\n"


def _csv_rows(result: TunedResult) -> list[dict[str, Any]]:
    base = result.default
    rows = []
    for row in base.rows():
        i = base.names.index(row["score"])
        j = base.oods_title.index(row["ood"])
        record = result.tuning[i]
        metric = row["metric"]
        tuned = math.nan
        if metric in _METRIC_INDEX:
            tuned = float(result.evals[i, j, _METRIC_INDEX[metric]])
        elif not record.changed:  # decisions: recomputed only for the defaults
            tuned = row["value"]
        rows.append(
            dict(
                row,
                tuned_value=tuned,
                tuned_params=_chosen(result, i),
                val_auroc=record.val_auroc,
                grid_points=len(record.points),
                validated_choice=int(i == result.choice),
            )
        )
    if result.combination_evals is not None:
        for j, ood in enumerate(base.oods_title):
            for metric, m in _METRIC_INDEX.items():
                value = float(result.combination_evals[j, m])
                rows.append(
                    {"protocol": base.protocol, "score": result.combination_name,
                     "layers": "", "ood": ood, "metric": metric, "value": value,
                     "tuned_value": value, "tuned_params": "validated rank average",
                     "val_auroc": result.combination_val, "grid_points": 0,
                     "validated_choice": 0}
                )  # fmt: skip
    return rows


def write_tuned_outputs(
    results: Sequence[TunedResult], out: str | Path, *, command: str = "scio bench --tune"
) -> list[Path]:
    """The default outputs (:func:`scio.bench.runner.write_outputs`), then a tuning
    section per protocol in ``report.md`` and the :data:`TUNED_COLUMNS` in ``results.csv``
    (plus rows for each validated rank average)."""
    paths = write_outputs([r.default for r in results], out, command=command)
    report, csv_path = Path(out) / "report.md", Path(out) / "results.csv"
    with report.open("a") as handle:
        handle.write("\n" + "\n".join(tuning_markdown(r) for r in results))
    rows = [row for r in results for row in _csv_rows(r)]
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields) or ["protocol"], restval="")
        writer.writeheader()
        writer.writerows(rows)
    return paths
