"""``scio bench`` command line."""

from __future__ import annotations

import argparse
import shlex

__all__ = ["add_bench_parser", "run"]


def add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``bench`` sub-command."""
    from scio.bench.runner import DEFAULT_SCORES, SCORE_FACTORIES

    bench = sub.add_parser(
        "bench",
        help="real-data OoD benchmark (Fashion-MNIST, offline)",
        description="Fit confidence scores on the embedded Fashion-MNIST models and evaluate "
        "them against far-OoD and near-OoD sets; prints a summary table and writes "
        "report.md, results.csv and summary figures to --out.",
    )
    bench.add_argument(
        "--scores",
        nargs="+",
        default=list(DEFAULT_SCORES),
        metavar="NAME",
        help=f"scores to run (default: all): {', '.join(SCORE_FACTORIES)}",
    )
    bench.add_argument("--protocol", choices=("far", "near", "both"), default="both", help="(both)")
    bench.add_argument("--n-calib", type=int, default=5000, help="calibration inputs (5000)")
    bench.add_argument("--n-test", type=int, default=2000, help="inputs per test set (2000)")
    bench.add_argument("--batch-size", type=int, default=500, help="(500)")
    bench.add_argument("--seed", type=int, default=0, help="(0)")
    bench.add_argument("--out", default="bench-out", help="output folder (bench-out)")
    bench.add_argument("--no-progress", action="store_true", help="hide progress bars")
    bench.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``scio bench`` with parsed arguments."""
    from rich.console import Console

    from scio.bench.runner import run_benchmark, write_outputs

    console = Console()
    if not console.is_terminal:
        console = Console(width=220)  # files and pipes: keep table rows on one line
    protocols = ("far", "near") if args.protocol == "both" else (args.protocol,)
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
        )
        for protocol in protocols
    ]
    command = "scio " + " ".join(shlex.quote(arg) for arg in getattr(args, "argv", ["bench"]))
    paths = write_outputs(results, args.out, command=command)
    console.print("Wrote " + ", ".join(str(p) for p in paths))
    return 0
