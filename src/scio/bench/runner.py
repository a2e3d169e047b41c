"""Run a benchmark protocol: fit scores, score InD and OoD sets, write the report."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from scio import scores as S
from scio.bench.protocols import PROTOCOLS, Protocol
from scio.bench.result import DECISION_ALPHA, METRIC_NAMES, BenchResult
from scio.eval import AUC, AUPR, FPR, compute_confidence, compute_metrics, fit_scores
from scio.scores import BaseScoreClassif
from scio.utils.misc import HEAVY_HEAD_ROUNDED_BOTTOM

__all__ = [
    "DECISION_ALPHA",
    "DEFAULT_SCORES",
    "METRIC_NAMES",
    "SCORE_FACTORIES",
    "BenchResult",
    "conformal_decisions",
    "run_benchmark",
    "summary_table",
    "write_outputs",
]

FEATURES = "avgpool"  # 128-d penultimate features of the Fashion-MNIST CNNs
LOGITS = "fc"
MID = "pool2"  # 64×7×7 mid-level feature maps

ScoreSpec = tuple[Callable[[], BaseScoreClassif], tuple[str, ...]]

SCORE_FACTORIES: dict[str, ScoreSpec] = {
    "Softmax": (S.Softmax, ()),
    "Logit": (S.Logit, ()),
    "Energy": (S.Energy, ()),
    "JointEnergy": (S.JointEnergy, ()),
    "ODIN": (lambda: S.ODIN(temperature=1000.0, epsilon=0.0014), ()),
    "ReAct": (lambda: S.ReAct(percentile=90.0), (FEATURES,)),
    "IsoMax": (lambda: S.IsoMax(n_steps=300), ()),
    "GradNorm": (S.GradNorm, (LOGITS,)),
    "KNN": (lambda: S.KNN(k=50), (FEATURES,)),
    "LID": (lambda: S.LID(k=50), (FEATURES,)),
    "Trust": (lambda: S.Trust(alpha=0.1, k=10), (FEATURES,)),
    "DeepMahalanobis": (S.DeepMahalanobis, (FEATURES,)),
    "RelativeMahalanobis": (S.RelativeMahalanobis, (FEATURES,)),
    "DkNN": (lambda: S.DkNN(k=50), (MID, FEATURES)),
    "FeatureSqueezing": (lambda: S.FeatureSqueezing(squeezers=("bits:3", "median:2")), ()),
    "Gram": (lambda: S.Gram(max_gram_order=5), (MID, FEATURES)),
    "Odds": (lambda: S.Odds(epsilon=0.05, noise_samples=16), ()),
    "JTLA": (
        lambda: S.JTLA(test={"type": "multinomial", "mode": "mle", "k": 50}),
        (MID, FEATURES),
    ),
    "ViM": (S.ViM, (FEATURES,)),
    "NNGuide": (S.NNGuide, (FEATURES,)),
    "fDBD": (S.fDBD, (FEATURES,)),
    "NCI": (S.NCI, (FEATURES,)),
    "SHE": (S.SHE, (FEATURES,)),
    "Entropy": (S.Entropy, ()),
    "GEN": (S.GEN, ()),
    "KLM": (S.KLM, ()),
    "OpenMax": (S.OpenMax, ()),
    "ASH": (S.ASH, (FEATURES,)),
    "SCALE": (S.SCALE, (FEATURES,)),
    "DICE": (S.DICE, (FEATURES,)),
    "VRA": (S.VRA, (FEATURES,)),
    "CFOOD": (S.CFOOD, (FEATURES,)),
    "Relation": (S.Relation, (FEATURES,)),
    "Residual": (lambda: S.Residual(dim=64), (FEATURES,)),  # OpenOOD's 512 needs d > 512
    "ReweightOOD": (S.ReweightOOD, (FEATURES,)),
    "AdaScale-a": (S.AdaScale, (FEATURES,)),
    "AdaScale-l": (lambda: S.AdaScale(variant="l"), (FEATURES,)),
    "IODIN": (S.IODIN, ()),
    "RankFeat": (S.RankFeat, ("block3", "block4")),  # the last two conv blocks
    "GMM": (  # OpenOOD's weighted layer (flat, PCA to 50, 50 clusters) on the features
        lambda: S.GMM(
            num_clusters_list=(50,),
            feature_type_list=("flat",),
            alpha_list=(1.0,),
            reduce_dim_list=("pca_50",),
        ),
        (FEATURES,),
    ),
    "GROOD": (lambda: S.GROOD(use_proto_mean=True), (FEATURES,)),  # no OoD data at fit
}
DEFAULT_SCORES: tuple[str, ...] = tuple(SCORE_FACTORIES)

_METRICS = (AUC(), FPR(tpr=0.95), AUPR(positive="ind"), AUPR(positive="ood"))


def conformal_decisions(
    confs_ind: np.ndarray,
    confs_oods: Sequence[np.ndarray],
    alpha: float = DECISION_ALPHA,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Conformal decisions (:mod:`scio.decision`) at a guaranteed false-alarm rate ``alpha``.

    A seeded random half of the InD test conformities is the holdout, the other half
    measures the InD rejection rate. Returns ``(n_scores, 1 + n_oods)``: the InD rejection
    rate, then the fraction of each OoD set flagged (NaN for a score with NaN conformities).
    """
    from scio.decision.pvalues import conformal_p_values, sorted_holdout

    result = np.full((len(confs_ind), 1 + len(confs_oods)), math.nan)
    perm = np.random.default_rng(seed).permutation(confs_ind.shape[1] if confs_ind.size else 0)
    holdout, test = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    for i, row in enumerate(confs_ind):
        sets = [row[test], *(ood[i] for ood in confs_oods)]
        if np.isnan(row).any() or any(np.isnan(s).any() for s in sets) or len(holdout) < 1:
            continue
        prepared = sorted_holdout(torch.from_numpy(row[holdout]))
        for j, conf in enumerate(sets):
            p = conformal_p_values(prepared, torch.from_numpy(np.ascontiguousarray(conf)))
            result[i, j] = float((p <= alpha).double().mean())
    return result


def _forward_time(net: torch.nn.Module, sets: Sequence[torch.Tensor], batch_size: int) -> float:
    """Best of two timed plain forward passes over every set (the first one warms up)."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        with torch.no_grad():
            for data in sets:
                for i in range(0, len(data), batch_size):
                    net(data[i : i + batch_size])
        times.append(time.perf_counter() - start)
    return min(times)


def _fit(
    names: Sequence[str], proto: Protocol, batch_size: int, show_progress: bool
) -> tuple[list[tuple[str, BaseScoreClassif, tuple[str, ...]]], dict[str, str]]:
    """Fit all scores in one shared feature pass; isolate a failing score if any."""
    specs = [
        (
            name,
            proto.factories.get(name, SCORE_FACTORIES[name][0])(),
            tuple(proto.layers.get(layer, layer) for layer in SCORE_FACTORIES[name][1]),
        )
        for name in names
    ]  # the protocol's model may rename the (CNN) layers and replace a factory
    # module names are valid layer specs for the recorder (an extension of (depth, idx))
    pairs: list[Any] = [(score, layers) for _, score, layers in specs]
    try:
        fit_scores(pairs, proto.net, proto.calib_data, proto.calib_labels,
                   batch_size=batch_size, show_progress=show_progress)  # fmt: skip
        return specs, {}
    except Exception:  # find the culprit(s): fit one by one
        kept, skipped = [], {}
        for name, score, layers in specs:
            try:
                single: list[Any] = [(score, layers)]
                fit_scores(single, proto.net, proto.calib_data, proto.calib_labels,
                           batch_size=batch_size, show_progress=False)  # fmt: skip
                kept.append((name, score, layers))
            except Exception as exc:  # reported, not fatal
                skipped[name] = f"{type(exc).__name__}: {exc}"
        return kept, skipped


def run_benchmark(
    protocol: str = "far",
    *,
    scores: Sequence[str] | None = None,
    n_calib: int = 5000,
    n_test: int = 2000,
    batch_size: int = 500,
    seed: int = 0,
    show_progress: bool = True,
    console: Console | None = None,
    loaded: Protocol | None = None,
    keep_scores: list[BaseScoreClassif] | None = None,
    model: str = "cnn",
) -> BenchResult:
    """Fit ``scores`` on a protocol's calibration data and evaluate them on its OoD sets.

    Args:
        protocol: ``"far"`` or ``"near"``.
        scores: names from :data:`SCORE_FACTORIES` (default: all).
        n_calib: calibration inputs (from the held-out part of the training split).
        n_test: InD test inputs, and inputs per OoD set (capped by the set's size).
        batch_size: inputs per forward pass, for fitting and scoring.
        seed: seed of every subsampling.
        show_progress: rich progress bars.
        console: where to print the summary table (default: stdout).
        loaded: the protocol's data and model, already loaded (``scio bench --tune``).
        keep_scores: if given, the fitted scores are appended to it (``result.names`` order).
        model: the model family, a key of :data:`scio.bench.protocols.MODELS` (``"cnn"``,
            ``"vit"``); the scores' layers are mapped to its modules.
    """
    if protocol not in PROTOCOLS:
        msg = f"`protocol` must be one of {sorted(PROTOCOLS)} (got {protocol!r})"
        raise ValueError(msg)
    names = list(scores) if scores else list(DEFAULT_SCORES)
    unknown = [name for name in names if name not in SCORE_FACTORIES]
    if unknown:
        msg = f"Unknown scores {unknown}; choose from {sorted(SCORE_FACTORIES)}"
        raise ValueError(msg)
    console = console or Console()
    torch.manual_seed(seed)
    proto = loaded or PROTOCOLS[protocol](n_calib=n_calib, n_test=n_test, seed=seed, model=model)
    sets = [proto.ind, *proto.oods]
    forward_s = _forward_time(proto.net, sets, batch_size)
    specs, skipped = _fit(names, proto, batch_size, show_progress)
    fitted = [score for _, score, _ in specs]
    if keep_scores is not None:
        keep_scores.extend(fitted)
    fit_s = [sum(s.duration for s in score.timer.calibration) for score in fitted]
    for score in fitted:
        score.reset_timer()
    start = time.perf_counter()
    confs_ind, confs_oods = compute_confidence(
        fitted, ind=proto.ind, oods=proto.oods, oods_title=proto.oods_title,
        batch_size=batch_size, show_progress=show_progress,
    )  # fmt: skip
    joint_s = time.perf_counter() - start
    infer_s = [sum(s.duration for s in score.timer.inference) for score in fitted]
    evals = compute_metrics(confs_ind, confs_oods, _METRICS)
    decisions = conformal_decisions(confs_ind, confs_oods, DECISION_ALPHA, seed=seed)
    result = BenchResult(
        protocol=protocol,
        description=proto.description,
        names=[name for name, _, _ in specs],
        layers=[layers for _, _, layers in specs],
        oods_title=proto.oods_title,
        evals=evals,
        fit_s=fit_s,
        infer_s=infer_s,
        forward_s=forward_s,
        n_infer=sum(len(s) for s in sets),
        n_calib=len(proto.calib_data),
        skipped=skipped,
        confs_ind=confs_ind,
        confs_oods=confs_oods,
        joint_s=joint_s,
        decisions=decisions,
    )
    console.print(summary_table(result))
    for name, reason in skipped.items():
        console.print(f"[yellow]Skipped {name}[/]: {reason}")
    return result


# -- outputs ------------------------------------------------------------------------------------
def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"


def summary_table(result: BenchResult) -> Table:
    """Rich table: one row per score, one column per OoD set (AUROC / FPR@95 / AUPR-In /
    AUPR-Out), plus fit time, inference time and overhead over a plain forward pass."""
    table = Table(
        title=f"scio bench — {result.protocol}-OoD: {result.description}\n"
        f"cells: {' / '.join(METRIC_NAMES)} (best AUROC per column in bold)",
        box=HEAVY_HEAD_ROUNDED_BOTTOM,
        show_lines=True,
    )
    table.add_column("Score\n↳ layers")
    for title in result.oods_title:
        table.add_column(title, justify="center")
    table.add_column("Mean AUROC", justify="center")
    table.add_column("Fit (s)", justify="right")
    table.add_column("Inference (s)", justify="right")
    table.add_column("Overhead", justify="right")
    table.add_column("α=5 % decisions\nInD rej. / OoD det.", justify="center")
    best = np.nanmax(result.evals[:, :, 0], axis=0) if len(result.names) else []
    for i, name in enumerate(result.names):
        cells = []
        for j in range(len(result.oods_title)):
            values = result.evals[i, j]
            text = " / ".join(_fmt(v) for v in values)
            cells.append(f"[bold]{text}[/]" if values[0] == best[j] else text)
        label = name + (f"\n↳ {', '.join(result.layers[i])}" if result.layers[i] else "")
        table.add_row(
            label,
            *cells,
            _fmt(float(np.mean(result.evals[i, :, 0]))),
            f"{result.fit_s[i]:.2f}",
            f"{result.infer_s[i]:.2f}",
            f"{result.overhead(i):.2f}×",
            _decision_cell(result, i),
        )
    table.caption = (
        f"{result.n_calib} calibration inputs; inference over {result.n_infer} inputs; plain "
        f"forward pass {result.forward_s:.2f} s; all scores jointly {result.joint_s:.2f} s. "
        "Overhead = (forward + the score's own inference work) / forward."
    )
    return table


def _decision_cell(result: BenchResult, i: int) -> str:
    if result.decisions is None:
        return "–"
    row = result.decisions[i]
    return f"{_fmt(row[0])} / {_fmt(float(np.mean(row[1:])))}"


def _markdown(result: BenchResult, command: str) -> str:
    lines = [
        f"## {result.protocol}-OoD",
        "",
        result.description + ".",
        "",
        f"Command: `{command}`",
        "",
        "AUROC (↑) per OoD set:",
        "",
        "| score | layers | " + " | ".join(result.oods_title) + " | mean |",
        "|---|---|" + "---:|" * (len(result.oods_title) + 1),
    ]
    for i, name in enumerate(result.names):
        aurocs = result.evals[i, :, 0]
        lines.append(
            f"| {name} | {', '.join(result.layers[i]) or '–'} | "
            + " | ".join(_fmt(v) for v in aurocs)
            + f" | {_fmt(float(np.mean(aurocs)))} |"
        )
    lines += [
        "",
        "FPR@95TPR (↓, fraction of OoD accepted when 95 % of InD is kept) / AUPR-In / "
        "AUPR-Out per OoD set:",
        "",
        "| score | " + " | ".join(result.oods_title) + " |",
        "|---|" + "---|" * len(result.oods_title),
    ]
    for i, name in enumerate(result.names):
        cells = [
            " / ".join(_fmt(v) for v in result.evals[i, j, 1:])
            for j in range(len(result.oods_title))
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Cost ({result.n_calib} calibration inputs; {result.n_infer} scored inputs; a plain "
        f"forward pass over them takes {result.forward_s:.2f} s; every score evaluated "
        f"jointly, one shared forward per batch, takes {result.joint_s:.2f} s). Overhead = "
        "(forward + the score's own work on top of the shared forward) / forward:",
        "",
        "| score | fit (s) | inference (s) | overhead vs forward |",
        "|---|---:|---:|---:|",
    ]
    for i, name in enumerate(result.names):
        lines.append(
            f"| {name} | {result.fit_s[i]:.2f} | {result.infer_s[i]:.2f} | "
            f"{result.overhead(i):.2f}× |"
        )
    if result.decisions is not None:
        lines += [
            "",
            f"Decisions at a guaranteed {DECISION_ALPHA:.0%} false-alarm rate (conformal "
            "p-values, `scio.decision`; holdout = a random half of the InD test set): "
            "measured InD rejection rate on the other half, and fraction of each OoD set "
            "flagged:",
            "",
            "| score | InD rejected | " + " | ".join(result.oods_title) + " |",
            "|---|---:|" + "---:|" * len(result.oods_title),
        ]
        for i, name in enumerate(result.names):
            decided = " | ".join(_fmt(v) for v in result.decisions[i])
            lines.append(f"| {name} | {decided} |")
    if result.skipped:
        lines += ["", "Skipped:", ""]
        lines += [f"- {name}: {reason}" for name, reason in result.skipped.items()]
    return "\n".join(lines) + "\n"


def write_outputs(
    results: Sequence[BenchResult], out: str | Path, *, command: str = "scio bench"
) -> list[Path]:
    """Write ``report.md``, ``results.csv`` and one ``summary_<protocol>.png`` per protocol
    into ``out``; returns the written paths."""
    from scio.bench.figures import summary_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    sections = ["# scio bench report", ""]
    for result in results:
        figure = out / f"summary_{result.protocol}.png"
        summary_figure(result, figure)
        written.append(figure)
        sections.append(_markdown(result, command) + f"\n![summary]({figure.name})\n")
    report = out / "report.md"
    report.write_text("\n".join(sections))
    rows = [row for result in results for row in result.rows()]
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["protocol"])
        writer.writeheader()
        writer.writerows(rows)
    return [report, csv_path, *written]
