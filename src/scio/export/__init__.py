"""Export a fitted score for serving: one module, one graph, ``(out, conformity)`` out.

Three routes, from the most to the least flexible (``docs/deploying.md``):

* :func:`as_module` — an eager ``torch.nn.Module`` holding the network and the fitted state
  (buffers), ``forward(x) -> (out, conformity)`` equal to ``score(x)``, with no hooks, no
  recorder and nothing changed per call; every score, gradient-based ones included.
* :func:`export_program` — a ``torch.export`` program with a free batch dimension.
* :func:`export_onnx` — an ONNX file (``pip install "scio[export]"``), checked with ONNX
  Runtime against the eager module before it is written.

Scores that need input gradients or run the network on other inputs (ODIN and
Mahalanobis with ``epsilon > 0``, FeatureSqueezing, Odds, ...) are eager only: the two
graph routes raise :class:`ExportError` saying so.
"""

from scio.export.errors import ExportError
from scio.export.module import ScoreModule, as_module
from scio.export.routes import (
    DEFAULT_MAX_BATCH,
    Difference,
    compare,
    export_onnx,
    export_program,
    onnx_runner,
    random_batch,
    save_program,
)

__all__ = [
    "DEFAULT_MAX_BATCH",
    "Difference",
    "ExportError",
    "ScoreModule",
    "as_module",
    "compare",
    "export_onnx",
    "export_program",
    "onnx_runner",
    "random_batch",
    "save_program",
]
