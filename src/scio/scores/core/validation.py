"""Input checks and the no-side-effect guard shared by every score."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from scio.recorder.modes import eval_mode

__all__ = ["check_device", "check_dtype", "check_inputs", "eval_mode"]


def check_inputs(inputs: Any, sample_shape: tuple[int, ...] | None, *, name: str) -> None:
    """Raise a clear error unless ``inputs`` is a non-empty tensor batch.

    Any dtype is accepted, as in the reference (e.g. integer token ids for a network that
    embeds them); :func:`check_dtype` catches a floating dtype the network does not use.

    Args:
        inputs: the batch to check.
        sample_shape: the per-sample shape it must have (``None``: any).
        name: the argument name used in messages.
    """
    if not isinstance(inputs, Tensor):
        msg = f"`{name}` must be a torch.Tensor (got {type(inputs).__name__})"
        raise TypeError(msg)
    if inputs.ndim == 0 or len(inputs) == 0:
        msg = f"`{name}` must hold at least one sample (got shape {tuple(inputs.shape)})"
        raise ValueError(msg)
    if sample_shape is not None and tuple(inputs.shape[1:]) != tuple(sample_shape):
        msg = (
            f"`{name}` samples must have shape {tuple(sample_shape)} like the calibration "
            f"data (got {tuple(inputs.shape[1:])})"
        )
        raise ValueError(msg)


def check_device(inputs: Tensor, net: nn.Module, *, name: str) -> None:
    """Raise ``ValueError`` if ``inputs`` is not on the device of ``net``'s parameters."""
    for param in net.parameters():
        if param.device != inputs.device:
            msg = (
                f"`{name}` is on {inputs.device} but the network is on {param.device}; "
                f"move one of them (e.g. `{name}.to({str(param.device)!r})`)"
            )
            raise ValueError(msg)
        return


def check_dtype(inputs: Tensor, net: nn.Module, *, name: str) -> None:
    """Raise ``RuntimeError`` (torch's error type for this mismatch) if floating ``inputs``
    do not have the floating dtype of ``net``'s first floating parameter."""
    if not inputs.is_floating_point():
        return
    for param in net.parameters():
        if not param.is_floating_point():
            continue
        if param.dtype != inputs.dtype:
            kind = str(param.dtype).removeprefix("torch.")
            msg = (
                f"`{name}` is {str(inputs.dtype).removeprefix('torch.')} but the network "
                f"computes in {kind}: convert the inputs with `{name}.to(torch.{kind})` (or "
                f"the network with `net.to({inputs.dtype!s})`)"
            )
            raise RuntimeError(msg)
        return
