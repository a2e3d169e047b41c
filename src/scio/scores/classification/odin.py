"""ODIN: temperature scaling and input pre-processing."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration
from scio.scores.core.input_grad import (
    DEFAULT_MAX_BATCH,
    by_chunks,
    check_max_batch,
    frozen_parameters,
)
from scio.scores.core.validation import ParamRange, param_ranges
from scio.scores.utils import batched_grad, fgm_direction

__all__ = ["ODIN"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tempered_softmax(logits: Tensor, temperature: float) -> Tensor:
    work = logits.to(_work_dtype(logits.dtype))
    return torch.softmax(work / temperature, dim=1).to(logits.dtype)


class ODIN(NoCalibration, BaseScoreClassif):
    """ODIN (Liang et al., "Enhancing The Reliability of Out-of-distribution Image Detection
    in Neural Networks", ICLR 2018).

    Idea: temperature scaling spreads the softmax probabilities, and a small input step that
    increases the top softmax score helps in-distribution inputs more than OoD ones.

    Formula: with ``S(x) = softmax(f(x) / T)`` and
    ``x' = x + epsilon * d``, ``d`` the unit ``fgm_norm``-norm direction maximising
    ``<grad_x max_c log S(x)_c, d>`` (``sign`` of the gradient for ``fgm_norm = inf``, as in
    the paper), conformity ``c_j = S(x')_j`` (``x' = x`` when ``epsilon = 0``).

    Args:
        temperature: ``T > 0`` (required; the paper uses 1000).
        epsilon: perturbation magnitude (0 disables the input pre-processing).
        fgm_norm: norm of the perturbation, ``>= 1`` (default ``inf``).
        max_batch: with ``epsilon != 0``, rows per gradient pass (``None``: the whole batch
            at once). Bounds the autograd memory whatever the caller's batch size; results
            do not depend on it (up to float rounding of the network's batched kernels).
            Changing it keeps the score fit; ``repr`` shows it only when not the default.
        act_norm: unused (no recorded layer is read).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: nothing at calibration (no forward pass, labels ignored). Inference: one forward
    with ``epsilon = 0``; otherwise three passes per chunk of ``max_batch`` inputs: one
    forward building the graph (it also gives the returned ``out``), one backward to the
    inputs only (the network's parameters are frozen meanwhile, every ``requires_grad``
    flag restored afterwards, so no parameter gradient is computed or stored), and one
    forward on the perturbed inputs; peak memory is the autograd state of one chunk. Unlike
    the reference, the caller's ``inputs`` are left untouched (their ``requires_grad`` flag
    is not switched on: gradients are taken w.r.t. a detached view) and the returned ``out``
    (the logits of the unperturbed inputs) is detached.
    """

    temperature: float
    epsilon: float = 0.0
    fgm_norm: float = math.inf
    max_batch: int | None = DEFAULT_MAX_BATCH

    _extension_params = BaseScoreClassif._extension_params | {"max_batch"}
    _keeps_fit = frozenset({"max_batch"})  # a memory bound only
    _param_ranges = param_ranges(
        temperature=ParamRange.interval(0),
        epsilon=ParamRange(math.isfinite, "a finite number"),
        fgm_norm=ParamRange.interval(1, low_open=False),
    )

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        check_max_batch(self.max_batch)

    @property
    def _inference_needs_grad(self) -> bool:
        return bool(self.epsilon != 0)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        temperature = self.temperature
        if self.epsilon == 0:
            out = self.rnet(inputs, dont_record=True)
            return out, _tempered_softmax(out, temperature)
        with frozen_parameters(self.rnet.net):
            out, conformity = by_chunks(self._perturbed, inputs, self.max_batch)
        return out, conformity

    def _perturbed(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(out, conformity)`` of one chunk: forward with graph, input backward, forward."""
        temperature = self.temperature
        x = inputs.detach().requires_grad_()  # a new view: the caller's flag is unchanged
        out = self.rnet(x, dont_record=True)
        work = out.to(_work_dtype(out.dtype))
        top = torch.log_softmax(work / temperature, dim=1).max(dim=1).values
        grad = batched_grad(top, x)
        x_adv = x.detach() + self.epsilon * fgm_direction(grad, p=self.fgm_norm)
        with torch.no_grad():
            adv_out = self.rnet(x_adv, dont_record=True)
        return out.detach(), _tempered_softmax(adv_out, temperature)
