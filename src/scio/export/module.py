"""``as_module(score)``: a fitted score and its network as one ``torch.nn.Module``."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from scio.export.errors import ExportError, extra_passes_message, input_gradients_message
from scio.export.replay import ACTIVE, Call, Replay
from scio.export.state import FittedState, make_view
from scio.recorder import Recorder
from scio.recorder.io import read_output
from scio.recorder.recorder import _hook_for
from scio.scores.core.base import BaseScore
from scio.scores.core.validation import nonfinite_rows

__all__ = ["ScoreModule", "as_module"]

#: The code of every scio recorder hook (closures of one function share it).
_RECORDER_HOOK_CODE = _hook_for(object()).__code__


def _nan_where_nonfinite(x: Tensor, conformity: Tensor) -> Tensor:
    """``conformity`` with NaN for the samples of ``x`` holding a NaN or an infinite value
    (the graph form of score(x)'s rule; exported scores treat samples independently)."""
    if not x.is_floating_point() or x.ndim == 0:
        return conformity
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not conformity.is_floating_point():
        conformity = conformity.to(torch.get_default_dtype())
    mask = finite.view(-1, *([1] * (conformity.ndim - 1)))
    return torch.where(mask, conformity, torch.full((), math.nan, dtype=conformity.dtype))


def _strip_recorder_hooks(net: nn.Module) -> None:
    """Remove the forward hooks of scio recorders from ``net`` (a copy: the original keeps
    them)."""
    for module in net.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__code__", None) is _RECORDER_HOOK_CODE:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)


class ScoreModule(nn.Module):
    """A fitted score with its network: ``forward(x) -> (out, conformity)``, equal to
    ``score(x)``.

    Built by :func:`as_module`. The module holds a copy of the network (as a ``torch.fx``
    graph returning the logits, the recorded activations and the tapped head inputs) and
    the fitted state as buffers, so ``.to()`` moves or casts both; it is always in eval
    mode and changes nothing at a call, so one module serves many threads. The score's own
    conformity code runs on what the graph returns. ``torch.export`` and ONNX export it as
    one graph (see :mod:`scio.export`), except scores that need input gradients or run the
    network on other inputs, which run eagerly only. ``copy.deepcopy`` gives an independent
    module; to store one, save its ``state_dict()`` or export it (it cannot be pickled).

    Attributes:
        score_name: the score's class name.
        input_shape: the per-sample input shape seen at calibration (``None``: unknown).
        needs_input_grad: whether the score perturbs its inputs along a gradient.
    """

    _plain: Callable[[Tensor], tuple[Any, Any, Any]]
    _view: Any
    _process: Callable[[Tensor], tuple[Tensor, Tensor]]

    def __init__(self, replay: Replay, state: FittedState, view: BaseScore) -> None:
        super().__init__()
        self.replay = replay
        self.state = state
        self.__dict__["_replay"] = replay
        self.__dict__["_view"] = view
        self.__dict__["_plain"] = replay.__dict__["_plain"]
        self.__dict__["_process"] = view._process
        self.score_name: str = type(view).__mro__[1].__name__
        shape = view.__dict__.get("_fit_input_shape")
        self.input_shape: tuple[int, ...] | None = None if shape is None else tuple(shape)
        self.needs_input_grad: bool = bool(view._inference_needs_grad)
        replay.score_name = self.score_name
        self.train(False)

    @property
    def net(self) -> nn.Module:
        """The network's plain graph module (its modules are the copied network's)."""
        return self.replay.net

    def train(self, mode: bool = True) -> ScoreModule:
        """Scores run the network in eval mode: the module stays in eval mode."""
        return super().train(False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(out, conformity)`` of a batch ``x``, as ``score(x)``: samples holding a NaN or
        an infinite value get their network output and a NaN conformity."""
        if torch.compiler.is_exporting():
            if self.needs_input_grad:
                raise ExportError(input_gradients_message(self.score_name))
            (out, conformity), _ = self._run(x)
            return out, _nan_where_nonfinite(x, conformity)
        if self.needs_input_grad:
            if torch.is_inference_mode_enabled():  # as score(x): autograd needs it off
                with torch.inference_mode(False):
                    return self.forward(x.clone())
            with torch.enable_grad():
                return self._eager(x)
        if torch.is_grad_enabled():
            with torch.no_grad():  # as score(x); a caller's no_grad/inference_mode is kept
                return self._eager(x)
        return self._eager(x)

    def _eager(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.is_floating_point() or x.is_complex():
            total = x.sum()  # one reduction: NaN or infinite iff a value is (or it overflows)
            if not bool(total - total == 0):
                bad = nonfinite_rows(x)  # the exact check, as score(x)
                if bad is not None:
                    return self._finite_rows(x, bad)
        return self._run(x)[0]

    def _finite_rows(self, x: Tensor, bad: Tensor) -> tuple[Tensor, Tensor]:
        # the score runs on the finite samples alone, exactly as score(x) (extra passes)
        call = Call(self.__dict__["_replay"], None, None, (), ())
        call.parent = ACTIVE.get()
        token = ACTIVE.set(call)
        try:
            result: tuple[Tensor, Tensor] = self._view._infer_rows(x, bad)
        finally:
            ACTIVE.reset(token)
        return result

    def _run(self, x: Tensor) -> tuple[tuple[Tensor, Tensor], Call]:
        replay: Replay = self.__dict__["_replay"]
        out, acts, tapped = self._plain(x)
        if type(out) is not Tensor or replay.output_spec is not None:
            out = read_output(out, replay.output_spec)
        call = Call(replay, x, out, acts, tapped)
        call.parent = ACTIVE.get()
        token = ACTIVE.set(call)
        try:
            result: tuple[Tensor, Tensor] = self._process(x)
        finally:
            ACTIVE.reset(token)
        return result, call

    def export_blocker(self, example: Tensor) -> str | None:
        """Why the module cannot be one exported graph (``None``: it can), from the score's
        needs and one eager call on ``example``."""
        if self.needs_input_grad:
            return input_gradients_message(self.score_name)
        with torch.no_grad():
            _, call = self._run(example)
        if call.extra_passes:
            return extra_passes_message(self.score_name)
        return None

    def __deepcopy__(self, memo: dict[int, Any]) -> ScoreModule:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        msg = (
            "A ScoreModule cannot be pickled (torch.save(module)): save its `state_dict()` "
            "(and load it into `as_module(score)`), or export it with `save_program` / "
            "`export_onnx`"
        )
        raise TypeError(msg)

    def extra_repr(self) -> str:
        return f"score={self.score_name}, input_shape={self.input_shape}"


def as_module(score: BaseScore) -> ScoreModule:
    """A fitted score and its network as one ``torch.nn.Module``.

    ``module(x)`` returns ``(out, conformity)`` equal to ``score(x)``. The module owns a
    copy of the network (without the recorder's hooks) traced with ``torch.fx`` into a graph
    that returns the logits, the recorded activations and the tapped head inputs, and the
    fitted state as buffers; the score's own conformity code runs on what the graph returns.
    Nearest-neighbour indexes become an exact search (matrix product and ``topk``). The
    score and its network are left untouched.

    Raises:
        TypeError: ``score`` is not a scio score.
        ExportError: the score is not fitted, has no :class:`~scio.recorder.Recorder`, uses
            an approximate (faiss IVF/HNSW) index, or ``torch.fx`` cannot trace its network.
    """
    if not isinstance(score, BaseScore):
        msg = f"`score` must be a fitted scio score (got {type(score).__name__})"
        raise TypeError(msg)
    name = type(score).__name__
    if not score.is_fit:
        msg = f"{name} is not fitted: call `score.fit(rnet, calib_data)` (or load a saved one)"
        raise ExportError(msg)
    rnet = score.__dict__.get("_rnet")
    if not isinstance(rnet, Recorder):
        msg = (
            f"{name} was fitted without a scio Recorder (got {type(rnet).__name__}): fit it "
            "with `Recorder(net, input_data=...)` to export it"
        )
        raise ExportError(msg)
    if rnet.__dict__.get("_keyword_inputs"):
        msg = (
            f"{name}'s network is called with dict batches (`net(**batch)`): an exported "
            "module takes one input tensor"
        )
        raise ExportError(msg)
    memo: dict[int, Any] = {}
    net = copy.deepcopy(rnet.__dict__.get("_inner", rnet.net), memo)
    _strip_recorder_hooks(net)
    net.eval()  # traced in eval mode (a traced `self.training` test is frozen)

    def mine(module: nn.Module) -> nn.Module:
        copied: nn.Module = memo[id(module)]
        return copied

    seqs = {mine(module): list(seq) for module, seq in rnet._record_seqs.items()}
    replay = Replay(net, seqs, [mine(module) for module in rnet._taps])
    replay.output_spec = rnet.__dict__.get("_output")
    replay.tokens = dict(rnet.__dict__.get("_tokens") or {})
    try:
        state = FittedState(score)
    except ValueError as exc:
        raise ExportError(f"{name} cannot be exported: {exc}") from None
    view = make_view(score, replay, state)
    view._bind_taps()  # e.g. a head discovered at fit: tapped on the copy
    try:
        replay.build()
    except ValueError as exc:
        msg = f"{name}'s network cannot be exported: {exc}"
        raise ExportError(msg) from exc
    return ScoreModule(replay, state, view)
