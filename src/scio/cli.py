"""Command line: ``scio demo`` (the tutorial), ``scio bench`` (real-data benchmark) and
``scio export`` (a saved score and its model as ONNX or a ``torch.export`` program)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the 'Inferring with Confidence' tutorial on the embedded model",
        description="Fit a KNN confidence score on the embedded Tiniest CIFAR-10 model and "
        "print the layer table, the fitted score, per-sample confidences and timings.",
    )
    demo.add_argument("--n-calib", type=int, default=10, help="calibration samples (10)")
    demo.add_argument("--n-test", type=int, default=5, help="test samples (5)")
    demo.add_argument("--k", type=int, default=None, help="KNN rank (int(n_calib**0.4))")
    demo.add_argument(
        "--layer", default="1,11", help="layer to record: 'depth,idx' or a module name (1,11)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scio`` console script."""
    parser = argparse.ArgumentParser(prog="scio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    from scio.bench.cli import add_bench_parser

    add_bench_parser(sub)
    from scio.export.cli import add_export_parser

    add_export_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "demo":
        from scio.demo import parse_layer, run_demo

        run_demo(
            n_calib=args.n_calib,
            n_test=args.n_test,
            k=args.k,
            layer=parse_layer(args.layer),
            seed=args.seed,
        )
        return 0
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
