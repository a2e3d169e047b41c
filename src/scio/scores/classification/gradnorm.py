"""GradNorm: norm of the gradient of the KL divergence to the uniform distribution."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import NoCalibration
from scio.scores.core.validation import ParamRange, param_ranges

__all__ = ["GradNorm"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class GradNorm(NoCalibration, BaseScoreClassif):
    """GradNorm (Huang et al., "On the Importance of Gradients for Detecting Distributional
    Shifts in the Wild", NeurIPS 2021).

    Idea: the gradient of the cross-entropy between the softmax output and the uniform
    distribution, w.r.t. the weights of the recorded layers (typically the last linear
    layer), is larger for in-distribution inputs.

    Formula: per sample, ``L(theta) = -(1/C) sum_c log softmax(z(theta) / T)_c`` and
    conformity = ``||grad_theta L||_{grad_norm}`` (gradients of every recorded learnable
    parameter, flattened and concatenated; one value per sample, shared by every class).
    For the final linear layer ``z = W h + b``, ``grad_z L = u = (softmax(z / T) - 1/C) / T``
    and the gradient is the outer product ``u ⊗ [h, 1]`` (the ``1`` only if the bias is
    recorded), whose entrywise norm factorises: ``||u||_p * ||[h, 1]||_p`` (for every order,
    including ``0`` and ``±inf``).

    Args:
        temperature: ``T > 0`` (default 1).
        grad_norm: order of the gradient norm (default 1, the paper's L1 norm).
        discard_functional_forward: on the general path, return the logits of a normal
            forward instead of those of the per-sample functional calls (same values up to
            rounding; costs one more forward).
        act_norm: unused.
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Parameters used: those of the recorded layers (``rnet.recorded_params``) that require
    grad; if there are none, inference raises ``RuntimeError``.

    Cost: nothing at calibration (no forward pass, labels ignored). At inference:

    * closed form (fully batched, no autograd, one forward whose captured input ``h`` of the
      layer is the only extra memory) when the used parameters are the weight and/or bias of
      a single ``nn.Linear`` that is called once, whose 2-D output is returned as-is by the
      network and whose parameters are shared with no other module (parameters used
      functionally elsewhere in ``forward`` cannot be detected and must be avoided);
    * otherwise per-sample gradients with ``torch.func`` (``vmap(grad(...))`` over
      ``functional_call``): one vectorised forward and backward, with the ``n x #params``
      per-sample gradients in memory.

    Returned ``out``: the plain forward's logits on the closed-form path; on the general path
    the per-sample functional logits (as in the reference; equal to the plain forward up to
    rounding, which is visible in float16) unless ``discard_functional_forward``.
    """

    temperature: float = 1.0
    grad_norm: float = 1.0
    discard_functional_forward: bool = False

    _param_ranges = param_ranges(
        temperature=ParamRange.interval(0),
    )

    def _grad_params(self) -> dict[str, Tensor]:
        """Recorded learnable parameters (detached), named as in ``rnet.named_parameters``."""
        params = {
            name: param.detach()
            for name, param in self.rnet.recorded_params.items()
            if param.requires_grad
        }
        if not params:
            msg = "Recorded layers must have at least one learnable parameters for score GradNorm"
            raise RuntimeError(msg)
        return params

    def _linear_owner(self) -> tuple[nn.Linear, bool, bool] | None:
        """The ``nn.Linear`` owning every used parameter (its weight and/or bias), if any.

        Returns ``(linear, uses_weight, uses_bias)``, or ``None`` if the parameters do not all
        belong to one linear layer (a plain ``nn.Linear`` forward), or if that layer's
        parameters are shared with another module.
        """
        ids = {id(param) for param in self.rnet.recorded_params.values() if param.requires_grad}
        for module in self.rnet.net.modules():
            if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
                continue  # subclasses overriding ``forward`` may not compute ``W h + b``
            own = {id(module.weight)} | ({id(module.bias)} if module.bias is not None else set())
            if not ids <= own:
                continue
            for other in self.rnet.net.modules():
                if other is not module and any(
                    id(param) in own for param in other.parameters(recurse=False)
                ):
                    return None
            uses_bias = module.bias is not None and id(module.bias) in ids
            return module, id(module.weight) in ids, uses_bias
        return None

    def _closed_form(
        self, inputs: Tensor, owner: tuple[nn.Linear, bool, bool]
    ) -> tuple[Tensor, Tensor | None]:
        """``(out, conformity)`` in closed form, or ``(out, None)`` if the linear layer turns
        out not to produce the network output directly (called more than once, output
        modified after it, non-2-D input)."""
        linear, uses_weight, uses_bias = owner
        self.rnet._tap(linear)  # also captured by a shared forward (JointInference)
        out = self.rnet(inputs, dont_record=True)
        calls = self.rnet._tapped_calls.get(linear, [])
        seen_inputs = [hidden for hidden, _ in calls]
        seen_outputs = [output for _, output in calls]
        if len(seen_outputs) != 1 or seen_outputs[0] is not out or out.ndim != 2:
            return out, None
        hidden = seen_inputs[0]
        if not isinstance(hidden, Tensor) or hidden.ndim != 2:
            return out, None
        work = _work_dtype(out.dtype)
        n, n_classes = out.shape
        temperature = self.temperature
        u = (torch.softmax(out.to(work) / temperature, dim=1) - 1 / n_classes) / temperature
        parts = [hidden.to(work)] if uses_weight else []
        if uses_bias:
            parts.append(torch.ones((n, 1), dtype=work, device=out.device))
        v = torch.cat(parts, dim=1)
        ord_ = self.grad_norm
        norms = torch.linalg.vector_norm(u, ord=ord_, dim=1)
        norms = norms * torch.linalg.vector_norm(v, ord=ord_, dim=1)
        return out, norms.to(out.dtype)

    def _functional(self, inputs: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(out, conformity)`` from per-sample gradients (``torch.func``), any layers."""
        if not isinstance(inputs, Tensor):
            msg = (
                "GradNorm needs per-sample gradients of the network here (its gradient layer "
                "is not a linear layer producing the logits), which it computes on one "
                f"tensor batch; got a dict batch with keys {list(inputs)}: record the "
                "classifier head (the linear layer giving the logits), whose gradient "
                "norm has a closed form on any batch"
            )
            raise TypeError(msg)
        rnet = self.rnet
        temperature = self.temperature

        def loss(theta: dict[str, Tensor], sample: Tensor) -> tuple[Tensor, Tensor]:
            logits = functional_call(rnet, theta, (sample.unsqueeze(0),), {"dont_record": True})
            log_p = torch.log_softmax(logits.to(_work_dtype(logits.dtype)) / temperature, dim=1)
            return -log_p.mean(), logits.squeeze(0)

        grads, logits = vmap(grad(loss, has_aux=True), in_dims=(None, 0))(params, inputs)
        n = len(inputs)
        flat = torch.cat([g.reshape(n, -1).to(_work_dtype(g.dtype)) for g in grads.values()], 1)
        norms = torch.linalg.vector_norm(flat, ord=self.grad_norm, dim=1).to(logits.dtype)
        if self.discard_functional_forward:
            logits = rnet(inputs, dont_record=True)
        return logits, norms

    def _bind_taps(self) -> None:
        owner = self._linear_owner()
        if owner is not None:
            self.rnet._tap(owner[0])

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        params = self._grad_params()
        owner = self._linear_owner()
        if owner is not None:
            out, conformity = self._closed_form(inputs, owner)
            if conformity is not None:
                return out, conformity
        return self._functional(inputs, params)
