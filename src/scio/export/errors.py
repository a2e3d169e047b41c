"""The one error of :mod:`scio.export`, and the reasons it gives."""

from __future__ import annotations

__all__ = ["ExportError", "extra_passes_message", "input_gradients_message"]


class ExportError(RuntimeError):
    """A score cannot be exported (the message says why)."""


def input_gradients_message(name: str) -> str:
    """Why a score perturbing its inputs along a gradient is not exported as a graph."""
    return (
        f"{name} needs input gradients at inference (input perturbations along a gradient): "
        "it cannot be exported as a graph. Use the eager module from `as_module(score)`, or "
        "set `epsilon=0`"
    )


def extra_passes_message(name: str) -> str:
    """Why a score that runs its network on other inputs is not exported as a graph."""
    return (
        f"{name} runs the network again on other inputs than the module's (perturbed, "
        "squeezed or noisy copies, or per-sample gradients): it cannot be exported as one "
        "graph. Use the eager module from `as_module(score)`"
    )
