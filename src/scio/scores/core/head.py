"""The classifier head as a score mixin: its weight, bias and input features, read from the
forward that computes the logits (see :func:`scio.recorder.head.find_head`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from scio.recorder.head import find_head
from scio.recorder.io import take_rows

if TYPE_CHECKING:
    from scio.recorder import Recorder
    from scio.scores.core.calibration import CalibBatch

__all__ = ["HeadMixin"]


class HeadMixin:
    """Mixin for scores reading the classifier head (list it first among the bases).

    Hyper-parameter ``head`` (module name, ``None``: discovered at fit, see
    :func:`find_head`); fitted attribute ``head_name``. Provides the head's weight, bias
    and input features for calibration batches (:meth:`head_features`) and at inference
    (:meth:`head_forward`), each from the forward that computes the logits.
    """

    head: str | None = None

    _head_fitted_attrs: ClassVar[tuple[str, ...]] = ("head_name",)

    # -- binding ----------------------------------------------------------------------------
    def _calib_prepare(self, rnet: Recorder, probe: Tensor) -> None:
        """Find the head on the first calibration inputs and tap its input."""
        name, module = find_head(rnet, take_rows(probe, slice(0, 2)), self.head)
        self.head_name: str = name  # fitted state (public annotations are hyper-parameters)
        rnet._tap(module)

    def _head_module(self) -> nn.Linear:
        rnet: Recorder = self.rnet  # type: ignore[attr-defined]
        try:
            module = rnet.net.get_submodule(self.head_name)
        except AttributeError:
            msg = f"The network has no head module {self.head_name!r} (was it fit on another?)"
            raise ValueError(msg) from None
        if module not in rnet._taps:
            rnet._tap(module)
        return module  # type: ignore[return-value]

    def _bind_taps(self) -> None:
        self._head_module()

    @property
    def head_weight(self) -> Tensor:
        """The head's weight ``W`` ``(C, d)`` (the module's own parameter: never modify it)."""
        return self._head_module().weight

    @property
    def head_bias(self) -> Tensor | None:
        """The head's bias ``b`` ``(C,)``, or ``None``."""
        return self._head_module().bias

    # -- features ---------------------------------------------------------------------------
    def head_features(self, batch: CalibBatch) -> Tensor:
        """The head's input ``(n, d)`` for a calibration batch (no extra forward)."""
        module = self._head_module()
        return batch.tapped(module).reshape(len(batch), -1)

    def head_forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(out, features)``: network output and the head's input, from one forward."""
        module = self._head_module()
        rnet: Recorder = self.rnet  # type: ignore[attr-defined]
        out = rnet(inputs)
        return out, rnet._tapped_inputs[module].reshape(out.shape[0], -1)

    def head_logits(self, features: Tensor, weight: Tensor | None = None) -> Tensor:
        """``F.linear(features, weight, b)`` with the head's bias (and weight by default)."""
        module = self._head_module()
        return F.linear(features, module.weight if weight is None else weight, module.bias)
