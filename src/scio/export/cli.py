"""``scio export``: a saved score and its model as an ONNX file or a ``torch.export`` program,
checked against the score before anything is written."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

__all__ = ["EMBEDDED_MODELS", "add_export_parser", "load_model", "run"]

#: ``--model`` names of the embedded (offline) models.
EMBEDDED_MODELS = ("tiniest", "fmnist", "fmnist_near")


def load_model(spec: str) -> Any:
    """The network named by ``spec``: an embedded model (:data:`EMBEDDED_MODELS`, with its
    shipped weights) or ``package.module:function``, a function called without arguments
    that returns the trained ``nn.Module``.

    Raises:
        ValueError: ``spec`` names neither, or the function does not return a module.
    """
    from torch import nn

    if spec in EMBEDDED_MODELS:
        models = importlib.import_module("scio.models")
        net = getattr(models, spec)()
    else:
        module_name, sep, function = spec.partition(":")
        if not sep or not module_name or not function:
            msg = (
                f"`--model` must be one of {', '.join(EMBEDDED_MODELS)} or "
                f"'package.module:function' (got {spec!r})"
            )
            raise ValueError(msg)
        try:
            factory = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as exc:
            msg = f"`--model {spec}`: cannot import {function!r} from {module_name!r} ({exc})"
            raise ValueError(msg) from exc
        net = factory()
    if not isinstance(net, nn.Module):
        msg = f"`--model {spec}` returned a {type(net).__name__}, not a torch.nn.Module"
        raise ValueError(msg)
    return net.eval()


def add_export_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``export`` sub-command."""
    parser = sub.add_parser(
        "export",
        help="export a saved score and its model to ONNX or a torch.export program",
        description="Load a score saved with `score.save(...)` next to its model, export both "
        "as one graph returning (out, conformity), run the exported graph and the score on "
        "random batches and print the largest difference; nothing is written beyond "
        "tolerance.",
        epilog='ONNX needs `pip install "scio[export]"`. Scores needing input gradients or '
        "extra network passes (ODIN/Mahalanobis with epsilon > 0, FeatureSqueezing, Odds) "
        "cannot be exported as a graph: use `scio.export.as_module` in Python.",
    )
    parser.add_argument("score_file", metavar="SCORE_FILE", help="file written by score.save")
    parser.add_argument(
        "--model",
        required=True,
        help=f"the network: {', '.join(EMBEDDED_MODELS)} (embedded) or 'package.module:function'",
    )
    parser.add_argument("--onnx", metavar="PATH", help="write an ONNX file (opset 20)")
    parser.add_argument(
        "--program", metavar="PATH", help="write a torch.export program (torch.export.save)"
    )
    parser.add_argument("--batch", type=int, default=37, help="size of the random check batch (37)")
    parser.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (1e-4)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (1e-4)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``scio export``; 0 on success, 1 (message on stderr, nothing written) otherwise."""
    if not args.onnx and not args.program:
        print("scio export: give --onnx PATH and/or --program PATH", file=sys.stderr)
        return 2
    if args.batch < 1:
        print(f"scio export: --batch must be >= 1 (got {args.batch})", file=sys.stderr)
        return 2
    import scio
    from scio.export import ExportError, as_module, export_onnx, random_batch, save_program
    from scio.serialization import ScoreFileError

    try:
        net = load_model(args.model)
        score = scio.load_score(args.score_file, net)
        module = as_module(score)
        example = random_batch(module, 8)
        batches = sorted({1, args.batch})
        kwargs = {"reference": score, "atol": args.atol, "rtol": args.rtol}
        for path, write, what in (
            (args.onnx, export_onnx, "ONNX Runtime"),
            (args.program, save_program, "torch.export program"),
        ):
            if not path:
                continue
            differences = write(module, example, path, check_batches=batches, **kwargs)
            worst = max(differences.values(), key=lambda d: d.max_abs)
            sizes = " and ".join(str(n) for n in differences)
            print(
                f"{path}: {type(score).__name__} checked with the {what} against the score "
                f"on random batches of {sizes}: {worst}"
            )
    except (ExportError, ScoreFileError, ValueError, ImportError, FileNotFoundError) as exc:
        print(f"scio export: {exc}", file=sys.stderr)
        return 1
    return 0
