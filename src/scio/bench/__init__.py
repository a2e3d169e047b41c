"""Real-data OoD benchmark that runs offline (``scio bench``).

Protocols (see ``docs/benchmark.md``):

* ``far``: in-distribution = Fashion-MNIST test, model :func:`scio.models.fmnist`; OoD =
  MNIST, Animal-MNIST, scikit-learn digits, scikit-image textures and photo crops, uniform
  noise.
* ``near``: model :func:`scio.models.fmnist_near` trained without ``Shirt`` and ``Ankle
  boot``; in-distribution = the 8 other test classes; OoD = the two held-out classes.

Calibration always uses the held-out part of the Fashion-MNIST *training* split.
"""

from scio.bench.protocols import PROTOCOLS, Protocol, far_ood, near_ood
from scio.bench.runner import DEFAULT_SCORES, SCORE_FACTORIES, BenchResult, run_benchmark

__all__ = [
    "DEFAULT_SCORES",
    "PROTOCOLS",
    "SCORE_FACTORIES",
    "BenchResult",
    "Protocol",
    "far_ood",
    "near_ood",
    "run_benchmark",
]
