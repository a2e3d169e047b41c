"""iODIN: ODIN whose input pre-processing changes a single input element."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration, ParamError
from scio.scores.core.input_grad import (
    DEFAULT_MAX_BATCH,
    by_chunks,
    check_max_batch,
    frozen_parameters,
)
from scio.scores.utils import batched_grad

__all__ = ["IODIN", "iodin_step"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tempered_softmax(logits: Tensor, temperature: float) -> Tensor:
    work = logits.to(_work_dtype(logits.dtype))
    return torch.softmax(work / temperature, dim=1).to(logits.dtype)


def iodin_step(grad: Tensor, noise: float, std: Tensor | None) -> Tensor:
    """The iODIN input step ``(n, *shape)``: zero except, per sample, at the element of
    largest ``|g|`` (first one on ties), where it is ``noise · s / std_c`` with ``s = +1``
    if ``g > 0`` else ``-1`` (OpenOOD's ``-noise · (2·[∂CE ≥ 0] - 1)``: the cross-entropy
    gradient is ``-g``) and ``std_c`` the ``input_std`` of the element's channel."""
    n = len(grad)
    flat = grad.reshape(n, -1)
    top = flat.abs().argmax(dim=1, keepdim=True)
    sign = torch.where(flat.gather(1, top) > 0, 1.0, -1.0).to(grad.dtype)
    step = torch.zeros_like(flat).scatter_(1, top, sign * noise).reshape(grad.shape)
    if std is not None:
        step = step / std.to(device=grad.device, dtype=grad.dtype)
    return step


class IODIN(NoCalibration, BaseScoreClassif):
    """iODIN (OpenOOD's ``iodin`` postprocessor): ODIN (Liang et al., ICLR 2018) whose input
    pre-processing perturbs only the most sensitive input element.

    Idea: as ODIN, temperature scaling spreads the softmax and a small input step that raises
    the top softmax score helps in-distribution inputs more than OoD ones; moving only the
    input element with the largest gradient keeps the input almost unchanged.

    Formula: with ``S(x) = softmax(f(x) / T)`` and ``g = ∇_x max_c log S(x)_c`` (the
    negated gradient of the cross-entropy with the predicted class), ``x' = x + noise ·
    s / std_c`` at the element ``i* = argmax_i |g_i|`` only (``s = +1`` if ``g_i* > 0``,
    else ``-1``; ``std_c`` the input standard deviation of its channel), and conformity
    ``c_j = S(x')_j``.

    Args:
        temperature: ``T > 0`` (default 1000).
        noise: step size (default 0.0014; 0 disables the pre-processing).
        input_std: per-channel standard deviation of the input normalisation (a number, or
            one per channel, dimension 1 of the inputs), dividing the step as in OpenOOD;
            ``None`` (default): steps are in the network's input units (OpenOOD uses its
            dataset's normalisation, ``(0.5, 0.5, 0.5)`` when unknown).
        max_batch: rows per gradient pass (``None``: the whole batch at once); results do
            not depend on it. Changing it keeps the score fit.
        act_norm: unused (no recorded layer is read).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    OpenOOD's confidence is ``max_j S(x')_j``; :meth:`confidence` reads ``S(x')`` at the
    class predicted on ``x``, the same unless the step changes the prediction.

    Cost: nothing at calibration. Inference: one forward with autograd, one backward to the
    inputs only (parameters frozen) and one forward on the perturbed inputs, per chunk of
    ``max_batch`` inputs; one forward when ``noise = 0``.
    """

    temperature: float = 1000.0
    noise: float = 0.0014
    input_std: float | tuple[float, ...] | list[float] | None = None
    max_batch: int | None = DEFAULT_MAX_BATCH

    _extension_params = BaseScoreClassif._extension_params | {"input_std", "max_batch"}
    _keeps_fit = frozenset({"max_batch"})  # a memory bound only

    def _check_param_value(self, name: str, value: Any) -> None:
        _validate(name, value)
        super()._check_param_value(name, value)

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        for name in ("temperature", "noise", "input_std", "max_batch"):
            _validate(name, getattr(self, name))

    @property
    def _inference_needs_grad(self) -> bool:
        return bool(self.noise != 0)

    def _std(self, inputs: Tensor) -> Tensor | None:
        """``input_std`` broadcastable to ``inputs`` (channels along dimension 1)."""
        std = self.input_std
        if std is None:
            return None
        if isinstance(std, (int, float)):
            return torch.tensor(float(std))
        channels = inputs.shape[1] if inputs.ndim > 1 else 1
        if len(std) != channels:
            msg = (
                f"`input_std` must hold one value per input channel ({channels}, dimension 1 "
                f"of the inputs) or be a number (got {len(std)} values)"
            )
            raise ValueError(msg)
        return torch.tensor([float(s) for s in std]).reshape(1, -1, *[1] * (inputs.ndim - 2))

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        temperature = self.temperature
        if self.noise == 0:
            out = self.rnet(inputs, dont_record=True)
            return out, _tempered_softmax(out, temperature)
        std = self._std(inputs)
        with frozen_parameters(self.rnet.net):
            out, conformity = by_chunks(
                lambda chunk: self._perturbed(chunk, std), inputs, self.max_batch
            )
        return out, conformity

    def _perturbed(self, inputs: Tensor, std: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(out, conformity)`` of one chunk: forward with graph, input backward, forward."""
        x = inputs.detach().requires_grad_()  # a new view: the caller's flag is unchanged
        with torch.enable_grad():
            out = self.rnet(x, dont_record=True)
            work = out.to(_work_dtype(out.dtype))
            top = torch.log_softmax(work / self.temperature, dim=1).max(dim=1).values
            grad = batched_grad(top, x)
        x_adv = x.detach() + iodin_step(grad, self.noise, std)
        with torch.no_grad():
            adv_out = self.rnet(x_adv, dont_record=True)
        return out.detach(), _tempered_softmax(adv_out, self.temperature)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate(name: str, value: Any) -> None:
    """Raise ``ParamError`` naming ``name`` unless ``value`` is valid for it."""
    if name == "temperature":
        if not _is_real(value) or not 0 < value < math.inf:
            msg = f"`temperature` must be a finite number > 0 (got {value!r})"
            raise ParamError(msg)
    elif name == "noise":
        if not _is_real(value) or not math.isfinite(value):
            msg = f"`noise` must be a finite number (got {value!r})"
            raise ParamError(msg)
    elif name == "input_std" and value is not None:
        values = value if isinstance(value, (tuple, list)) else (value,)
        if not values or not all(_is_real(v) and 0 < v < math.inf for v in values):
            msg = (
                "`input_std` must be None, a finite number > 0 or a sequence of them "
                f"(got {value!r})"
            )
            raise ParamError(msg)
    elif name == "max_batch":
        try:
            check_max_batch(value)
        except ValueError as exc:
            raise ParamError(str(exc)) from None
