"""Speed and memory of every score on the tutorial model (prints a markdown table).

For each algorithm: time of a plain forward pass over the test inputs, fit time on the
calibration inputs (and fit / forward: one forward over the same number of inputs),
inference time on the test inputs, the inference/forward ratio (the score's overhead: 1.0
means free), the peak resident memory of a process that only fits and runs that score
(each algorithm runs in its own subprocess) and that peak above the model + data baseline.

Two joint rows follow: every score fit with one shared forward per calibration batch
(``fit_jointly``) and evaluated with one shared forward per test batch
(``JointInference``), once for the single-pass scores only and once for all of them,
against the sum of the one-by-one inference times.

    python benchmarks/bench_scores.py                 # 2,000 calib + 2,000 test, batch 500
    python benchmarks/bench_scores.py --n 200 --only KNN Softmax

Inputs are uniform noise of CIFAR-10 shape: timings do not depend on the content. Labels
for label-using scores are the model's predictions on the calibration inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

FEATURES = (1, 11)  # Tiniest: average-pooled feature maps (penultimate layer)
LOGITS = (1, 12)
BLOCK3 = (1, 5)
L5, L6 = (1, 9), (1, 10)


def _registry() -> dict[str, tuple[Callable[[], Any], tuple[tuple[int, int], ...]]]:
    from scio import scores

    k = 50
    return {
        "Softmax": (lambda: scores.Softmax(), ()),
        "Logit": (lambda: scores.Logit(), ()),
        "Energy": (lambda: scores.Energy(), ()),
        "JointEnergy": (lambda: scores.JointEnergy(), ()),
        "ODIN (eps=0)": (lambda: scores.ODIN(temperature=1000.0), ()),
        "ODIN (eps=0.002)": (lambda: scores.ODIN(temperature=1000.0, epsilon=0.002), ()),
        "ReAct": (lambda: scores.ReAct(), (FEATURES,)),
        "IsoMax": (lambda: scores.IsoMax(), ()),
        "GradNorm (closed form)": (lambda: scores.GradNorm(), (LOGITS,)),
        "KNN": (lambda: scores.KNN(k=k), (FEATURES,)),
        "LID": (lambda: scores.LID(k=k), (FEATURES,)),
        "Trust": (lambda: scores.Trust(alpha=0.1), (FEATURES,)),
        "DeepMahalanobis": (lambda: scores.DeepMahalanobis(), (FEATURES,)),
        "DeepMahalanobis (eps=0.002)": (
            lambda: scores.DeepMahalanobis(epsilon=0.002),
            (FEATURES,),
        ),
        "RelativeMahalanobis": (lambda: scores.RelativeMahalanobis(), (FEATURES,)),
        "DkNN": (lambda: scores.DkNN(k=k), (BLOCK3, FEATURES)),
        "FeatureSqueezing": (
            lambda: scores.FeatureSqueezing(squeezers=("bits:5", "median:2")),
            (),
        ),
        "Gram": (lambda: scores.Gram(), (BLOCK3, FEATURES)),
        "Odds (16 noise samples)": (
            lambda: scores.Odds(epsilon=0.01, noise_samples=16),
            (),
        ),
        "JTLA": (
            lambda: scores.JTLA(test={"type": "multinomial", "mode": "mle", "k": k}),
            (BLOCK3, FEATURES),
        ),
        "ViM": (lambda: scores.ViM(), (FEATURES,)),
        "NNGuide": (lambda: scores.NNGuide(), (FEATURES,)),
        "fDBD": (lambda: scores.fDBD(), (FEATURES,)),
        "NCI": (lambda: scores.NCI(), (FEATURES,)),
        "SHE": (lambda: scores.SHE(), (FEATURES,)),
        "Entropy": (lambda: scores.Entropy(), ()),
        "GEN": (lambda: scores.GEN(), ()),
        "KLM": (lambda: scores.KLM(), ()),
        "OpenMax": (lambda: scores.OpenMax(), ()),
        "ASH": (lambda: scores.ASH(), (FEATURES,)),
        "SCALE": (lambda: scores.SCALE(), (FEATURES,)),
        "DICE": (lambda: scores.DICE(), (FEATURES,)),
        "VRA": (lambda: scores.VRA(), (FEATURES,)),
        "CFOOD": (lambda: scores.CFOOD(), (FEATURES,)),
        "Relation": (lambda: scores.Relation(), (FEATURES,)),
        "Residual": (lambda: scores.Residual(dim=40), (FEATURES,)),  # 80-d features
        "ReweightOOD": (lambda: scores.ReweightOOD(), (FEATURES,)),
        "AdaScale-a": (lambda: scores.AdaScale(), (FEATURES,)),
        "AdaScale-l": (lambda: scores.AdaScale(variant="l"), (FEATURES,)),
        "IODIN": (lambda: scores.IODIN(), ()),
        "RankFeat": (lambda: scores.RankFeat(), (L5, L6)),  # the last two blocks
        "GMM": (
            lambda: scores.GMM(
                num_clusters_list=(50,),
                feature_type_list=("flat",),
                alpha_list=(1.0,),
                reduce_dim_list=("pca_50",),
            ),
            (FEATURES,),
        ),
        "GROOD": (lambda: scores.GROOD(use_proto_mean=True), (FEATURES,)),
    }


def _batches(data: torch.Tensor, labels: torch.Tensor | None, size: int) -> list[Any]:
    return [
        (data[i : i + size], None if labels is None else labels[i : i + size])
        for i in range(0, len(data), size)
    ]


_JOINT = ("(joint: single-pass scores)", "(joint: all scores)")
#: Scores that need passes beyond the shared forward by design.
_MULTI_PASS = ("eps=", "FeatureSqueezing", "Odds", "AdaScale", "IODIN")


def _joint_names(name: str) -> list[str]:
    names = list(_registry())
    if name == _JOINT[0]:
        names = [n for n in names if not any(tag in n for tag in _MULTI_PASS)]
    return names


def _measure_joint(name: str, net: Any, calib: Any, labels: Any, test: Any, size: int) -> dict:
    from scio.scores import JointInference, fit_jointly

    registry = _registry()
    names = _joint_names(name)
    pairs = [(registry[n][0](), registry[n][1]) for n in names]
    start = time.perf_counter()
    fitted = fit_jointly(pairs, net, _batches(calib, labels, size))
    fit = time.perf_counter() - start
    joint = JointInference(fitted)
    start = time.perf_counter()
    joint.run(x for x, _ in _batches(test, None, size))
    inference = time.perf_counter() - start
    own = {n: sum(s.duration for s in score.timer.inference) for n, score in zip(names, fitted)}
    return {"fit": fit, "inference": inference, "shared": joint.shared_seconds, "own": own}


def _measure(name: str, n: int, batch_size: int) -> dict[str, Any]:
    """Fit and run one score; returns timings (seconds) and peak RSS (MiB)."""
    from scio.models import tiniest
    from scio.recorder import Recorder

    torch.manual_seed(0)
    net = tiniest()
    calib = torch.rand(n, 3, 32, 32)
    test = torch.rand(n, 3, 32, 32)
    with torch.no_grad():
        labels = torch.cat([net(x) for x, _ in _batches(calib, None, batch_size)]).argmax(1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in _batches(test, None, batch_size):
            net(x)
    forward = time.perf_counter() - start
    result: dict[str, Any] = {"name": name, "forward": forward}
    if name in _JOINT:
        result.update(_measure_joint(name, net, calib, labels, test, batch_size))
    elif name != "(forward only)":
        factory, layers = _registry()[name]
        score = factory()
        rnet = Recorder(net, input_data=calib[[0]])
        rnet.record(*layers)
        start = time.perf_counter()
        score.fit(rnet, _batches(calib, labels, batch_size))
        result["fit"] = time.perf_counter() - start
        start = time.perf_counter()
        for x, _ in _batches(test, None, batch_size):
            score(x)
        result["inference"] = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_mib"] = peak / 1024
    result["extra_mib"] = (peak - rss_before) / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="calibration and test inputs")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--only", nargs="*", help="algorithm names (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child, args.n, args.batch_size)))
        return
    names = args.only or [*_registry(), *_JOINT]
    threads = torch.get_num_threads()
    print(
        f"Tiniest (CIFAR-10, 97.5k params), {args.n} calibration + {args.n} test inputs, "
        f"batch {args.batch_size}, {threads} CPU threads, torch {torch.__version__}\n"
    )
    print(
        "| score | forward (s) | fit (s) | fit / forward | inference (s) | inference / forward "
        "| peak RSS (MiB) | above baseline (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    alone: dict[str, float] = {}
    for name in names:
        cmd = [sys.executable, __file__, "--n", str(args.n), "--batch-size", str(args.batch_size)]
        proc = subprocess.run(
            [*cmd, "--child", name], capture_output=True, text=True, env=dict(os.environ)
        )
        if proc.returncode != 0:
            error = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
            print(f"| {name} | – | – | – | – | failed: {error[:80]} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = r["inference"] / r["forward"]
        alone[name] = r["inference"]
        print(
            f"| {name} | {r['forward']:.2f} | {r['fit']:.2f} | {r['fit'] / r['forward']:.2f}× | "
            f"{r['inference']:.2f} | {ratio:.2f}× | {r['peak_mib']:.0f} | "
            f"{r['extra_mib']:.0f} |",
            flush=True,
        )
        if name in _JOINT:
            members = _joint_names(name)
            one_by_one = sum(alone.get(m, float("nan")) for m in members)
            extra = sum(r["own"].values()) / r["forward"]
            print(
                f"|   ↳ {len(members)} scores: jointly {r['inference']:.2f} s "
                f"({ratio:.2f} forwards; shared forward {r['shared']:.2f} s + own work "
                f"{extra:.2f} forwards) vs one by one {one_by_one:.2f} s "
                f"({one_by_one / r['forward']:.2f} forwards) |||||||",
                flush=True,
            )


if __name__ == "__main__":
    main()
