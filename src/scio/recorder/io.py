"""What goes into a network and what comes out: tensor or dict batches, structured outputs,
token sequences.

A batch is a tensor, or a mapping of named tensors for models called as ``model(**batch)``
(Hugging Face ``input_ids`` / ``attention_mask`` / ``pixel_values``); its size is the
leading dimension its tensors share. A network's output is read as its logits: the tensor
itself, the ``logits`` of a ``ModelOutput`` or dict, or the first element of a tuple, unless
``output=`` says otherwise. Token-sequence activations ``(n, T, d)`` can be reduced to one
vector per sample (``token="cls"`` or ``"mean"``) for feature scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

__all__ = [
    "Batch",
    "OutputSpec",
    "TokenReduction",
    "batch_size",
    "batch_tensors",
    "check_output_spec",
    "check_token",
    "concat_batches",
    "map_tensors",
    "read_output",
    "reduce_tokens",
    "split_labels",
    "take_rows",
    "unwrap_single",
]

Batch: TypeAlias = "Tensor | Mapping[str, Any]"
OutputSpec: TypeAlias = "str | Callable[[Any], Tensor] | None"
TokenReduction: TypeAlias = Literal["cls", "mean"]
LABELS_KEY = "labels"


def check_output_spec(output: object) -> None:
    """Raise ``TypeError`` unless ``output`` is ``None``, a key/attribute name or a callable."""
    if output is None or isinstance(output, str) or callable(output):
        return
    msg = (
        "`output` must be None (read the logits), the name of the output's logits "
        f"field, or a callable returning them (got {type(output).__name__})"
    )
    raise TypeError(msg)


def check_token(token: object) -> None:
    """Raise ``ValueError`` unless ``token`` is ``None``, ``"cls"`` or ``"mean"``."""
    if token is None or token in ("cls", "mean"):
        return
    msg = f"`token` must be None, 'cls' or 'mean' (got {token!r})"
    raise ValueError(msg)


def read_output(raw: Any, spec: OutputSpec) -> Any:
    """The logits of a network output ``raw`` (see the module docstring).

    Raises:
        TypeError: the output has no logits to read and ``spec`` does not say where they are.
    """
    if spec is None:
        if isinstance(raw, Tensor):
            return raw
        if isinstance(raw, Mapping):
            if "logits" in raw:
                return raw["logits"]
            what = f"{type(raw).__name__} with fields {list(raw)}"
        elif isinstance(raw, tuple | list) and raw and isinstance(raw[0], Tensor):
            return raw[0]
        else:
            what = type(raw).__name__
        msg = (
            f"The network returned a {what}, with no logits to read: pass "
            "`Recorder(..., output=...)` with the field name of its logits or a callable "
            "returning them"
        )
        raise TypeError(msg)
    if isinstance(spec, str):
        if isinstance(raw, Mapping) and spec in raw:
            return raw[spec]
        if hasattr(raw, spec):
            return getattr(raw, spec)
        msg = f"`output={spec!r}`: the network's {type(raw).__name__} output has no such field"
        raise TypeError(msg)
    return spec(raw)


def _tensors(inputs: Mapping[str, Any], name: str) -> dict[str, Tensor]:
    tensors = {k: v for k, v in inputs.items() if isinstance(v, Tensor) and v.ndim > 0}
    if not tensors:
        msg = f"`{name}` must hold at least one batched tensor (got keys {list(inputs)})"
        raise TypeError(msg)
    return tensors


def batch_size(inputs: Any, *, name: str = "inputs") -> int:
    """The number of samples of a tensor or dict batch.

    Raises:
        TypeError: neither a tensor nor a mapping holding batched tensors.
        ValueError: a 0-d tensor, or tensors of a dict batch that disagree on their leading
            dimension (the message names the key).
    """
    if isinstance(inputs, Tensor):
        if inputs.ndim == 0:
            msg = f"`{name}` must hold a batch dimension (got a 0-d tensor)"
            raise ValueError(msg)
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        tensors = _tensors(inputs, name)
        first, size = next((k, int(v.shape[0])) for k, v in tensors.items())
        for key, value in tensors.items():
            if int(value.shape[0]) != size:
                msg = (
                    f"`{name}[{key!r}]` has {int(value.shape[0])} samples but "
                    f"`{name}[{first!r}]` has {size}: every tensor of a batch must share its "
                    "leading (batch) dimension"
                )
                raise ValueError(msg)
        return size
    msg = f"`{name}` must be a torch.Tensor or a dict of tensors (got {type(inputs).__name__})"
    raise TypeError(msg)


def batch_tensors(inputs: Any) -> dict[str, Tensor]:
    """The batched tensors of a batch by name (a tensor batch: one, named ``""``)."""
    if isinstance(inputs, Tensor):
        return {"": inputs}
    return {k: v for k, v in inputs.items() if isinstance(v, Tensor) and v.ndim > 0}


def map_tensors(inputs: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every batched tensor of a tensor or dict batch."""
    if isinstance(inputs, Tensor):
        return fn(inputs)
    return {k: fn(v) if isinstance(v, Tensor) and v.ndim > 0 else v for k, v in inputs.items()}


def unwrap_single(inputs: Any, key: str | None) -> Any:
    """The tensor of a dict batch holding only ``key`` (a recorder built on a one-tensor
    dict, e.g. ``{"pixel_values": x}``, calls the network with a bare tensor under that
    key); anything else unchanged. Scores then treat such a batch as the tensor it is, so
    that input-space methods (ODIN, Feature Squeezing, ...) work on it."""
    if key is not None and isinstance(inputs, Mapping) and len(inputs) == 1 and key in inputs:
        value = inputs[key]
        if isinstance(value, Tensor):
            return value
    return inputs


def take_rows(inputs: Any, rows: Any) -> Any:
    """The samples ``rows`` (an index tensor, slice or mask) of a tensor or dict batch."""
    if isinstance(inputs, Tensor):
        return inputs[rows]
    return {k: v[rows] if isinstance(v, Tensor) and v.ndim > 0 else v for k, v in inputs.items()}


def concat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate tensor batches, or dict batches key by key."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(list(batches))
    return {
        key: torch.cat([b[key] for b in batches])
        if isinstance(value, Tensor) and value.ndim > 0
        else value
        for key, value in first.items()
    }


def split_labels(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` of a dict batch carrying its labels under ``"labels"`` (as
    Hugging Face data collators produce); ``(batch, None)`` for anything else."""
    if isinstance(batch, Mapping) and LABELS_KEY in batch:
        inputs = {k: v for k, v in batch.items() if k != LABELS_KEY}
        return inputs, batch[LABELS_KEY]
    return batch, None


def reduce_tokens(output: Any, token: TokenReduction | None, mask: Any = None) -> Any:
    """One vector per sample from a token sequence ``(n, T, d)``: the first (CLS) token or the
    mean over the tokens (over ``mask``'s non-zero tokens when an ``(n, T)`` attention mask
    is given). Anything else is returned unchanged."""
    if token is None or not isinstance(output, Tensor) or output.ndim != 3:
        return output
    if token == "cls":
        return output[:, 0]
    if isinstance(mask, Tensor) and mask.shape == output.shape[:2]:
        weights = mask.to(output.dtype).unsqueeze(-1)
        return (output * weights).sum(1) / weights.sum(1).clamp_min(1)
    return output.mean(1)
