"""Recording: wrap a network, choose layers, capture each call's activations.

:class:`Recorder` lists a network's layers and records the chosen ones; every forward's
activations live in a per-call :class:`~scio.recorder.capture.Capture` (found by the hooks
through a context variable, never stored on the recorder), so one recorder serves many
threads at once. Also here: shaped forwards that rerun only the network's tail
(:mod:`~scio.recorder.tail`), classifier-head discovery (:mod:`~scio.recorder.head`) and the
thread-safe eval-mode guard (:mod:`~scio.recorder.modes`).
"""

from scio.recorder.recorder import (
    DepthIdx,
    Postprocessor,
    Recorder,
    SharedForward,
    get_layer_info_depth_idx,
    lazy_func,
    shared_forward,
)

__all__ = [
    "DepthIdx",
    "Postprocessor",
    "Recorder",
    "SharedForward",
    "get_layer_info_depth_idx",
    "lazy_func",
    "shared_forward",
]
