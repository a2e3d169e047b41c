"""Serving latency of an exported score: ``score(x)`` vs ``as_module`` vs ``torch.export`` vs
ONNX Runtime, next to the plain forward, on the tutorial model.

    python benchmarks/bench_export.py                 # batch 1 and 64, the five scores
    python benchmarks/bench_export.py --model mlp     # a 16-80-10 MLP: the fixed costs
    python benchmarks/bench_export.py --batches 1 --scores Softmax KNN --seconds 0.5

Every call runs with one intra-op thread (``torch.set_num_threads(1)``, ONNX Runtime
``intra_op_num_threads=1``), so the numbers measure per-call cost, not parallelism. Each cell
is the process CPU time per call, in µs, of the best of ``--repeats`` blocks of calls
lasting about ``--seconds`` / ``--repeats`` each (CPU time, unlike wall time, does not
count the time other processes of a shared machine hold the cores). The torch routes run under
``torch.no_grad()`` as a server would; ONNX Runtime is fed the numpy view of the batch.
Prints a Markdown table (``docs/deploying.md``); it never asserts anything about time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCORES = ("Softmax", "KNN", "DeepMahalanobis", "ViM", "ReAct")


def _per_call_us(call: Callable[[], Any], seconds: float, repeats: int) -> float:
    """Best mean CPU time per call over ``repeats`` blocks, in µs."""
    for _ in range(5):
        call()
    start, n = time.process_time(), 0
    while time.process_time() - start < 0.05:
        call()
        n += 1
    per_block = max(1, int(n * seconds / repeats / 0.05))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(per_block):
            call()
        best = min(best, (time.process_time() - t0) / per_block)
    return best * 1e6


def _fit(name: str, net: nn.Module, calib: torch.Tensor, labels: torch.Tensor, layer: str) -> Any:
    from scio import scores
    from scio.recorder import Recorder

    factories: dict[str, Callable[[], Any]] = {
        "Softmax": scores.Softmax,
        "KNN": lambda: scores.KNN(k=50),
        "DeepMahalanobis": scores.DeepMahalanobis,
        "ViM": scores.ViM,
        "ReAct": lambda: scores.ReAct(readout="energy"),
    }
    rnet = Recorder(net, input_data=calib[:1])
    if name != "Softmax":
        rnet.record(layer)
    return factories[name]().fit(rnet, calib, labels)


def _onnx_session(module: Any, example: torch.Tensor) -> Any:
    """An ONNX Runtime session (one thread) on the module's ONNX export."""
    import onnxruntime

    from scio.export import export_onnx

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:  # the session keeps the model in memory
        path = Path(tmp) / "score.onnx"
        export_onnx(module, example, path)
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    from scio.export import as_module, export_program
    from scio.models import tiniest

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--scores", nargs="+", default=list(SCORES), choices=SCORES)
    parser.add_argument("--n-calib", type=int, default=512, help="calibration inputs (512)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per cell (1 s)")
    parser.add_argument("--repeats", type=int, default=7, help="blocks per cell (7)")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    parser.add_argument(
        "--model",
        choices=("tiniest", "mlp"),
        default="tiniest",
        help="the tutorial model (recording 'avgpool'), or a 16-80-10 MLP (recording its "
        "hidden layer) whose forward is so cheap that the table shows each route's fixed cost",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if args.model == "tiniest":
        net, shape, layer = tiniest(), (3, 32, 32), "avgpool"
        title = "tutorial model (tiniest), 'avgpool' recorded"
    else:
        net = nn.Sequential(nn.Linear(16, 80), nn.ReLU(), nn.Linear(80, 10)).eval()
        shape, layer, title = (16,), "1", "MLP 16-80-10, hidden layer recorded"
    calib = torch.rand(args.n_calib, *shape)
    with torch.no_grad():
        labels = net(calib).argmax(1)
    example = torch.rand(8, *shape)
    batches = {b: torch.rand(b, *shape) for b in args.batches}

    def timed(call: Callable[[], Any]) -> float:
        return _per_call_us(call, args.seconds, args.repeats)

    def no_grad(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return fn(x)

        return call

    routes = ["score(x)", "as_module", "torch.export"] + ([] if args.no_onnx else ["ONNX Runtime"])
    print(
        f"{title} (Softmax: nothing), torch {torch.__version__}, "
        f"torch.set_num_threads(1), {args.n_calib} calibration inputs; "
        f"CPU µs per call (best of {args.repeats} blocks), and the difference with the plain "
        "forward\n"
    )
    header = " | ".join(f"batch {b} | vs plain" for b in args.batches)
    print(f"| score | route | {header} |")
    print("|---|---|" + "---:|---:|" * len(args.batches))
    plain = {b: timed(no_grad(net, batches[b])) for b in args.batches}
    print("| plain forward | `net(x)` | " + " | ".join(f"{plain[b]:.0f} | " for b in plain) + "|")
    for name in args.scores:
        score = _fit(name, net, calib, labels, layer)
        module = as_module(score)
        program = export_program(module, example).module()
        session = None if args.no_onnx else _onnx_session(module, example)
        times: dict[str, dict[int, float]] = {route: {} for route in routes}
        for b, x in batches.items():
            calls: dict[str, Callable[[], Any]] = {
                "score(x)": lambda x=x, score=score: score(x),
                "as_module": no_grad(module, x),
                "torch.export": no_grad(program, x),
            }
            if session is not None:
                feed = {session.get_inputs()[0].name: x.numpy()}
                calls["ONNX Runtime"] = lambda feed=feed, run=session.run: run(None, feed)
            for route in routes:
                times[route][b] = timed(calls[route])
        for route in routes:
            cells = " | ".join(
                f"{times[route][b]:.0f} | {times[route][b] - plain[b]:+.0f}" for b in batches
            )
            print(f"| {name} | {route} | {cells} |")


if __name__ == "__main__":
    main()
