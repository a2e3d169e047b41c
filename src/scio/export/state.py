"""A fitted score's state as module buffers, and the score's own code reading them.

:func:`make_view` turns a fitted score into a *view*: an object of a subclass of the score's
class, so that every method (``get_conformity``, ``_process``, helpers, ``super()`` calls)
is the score's own, whose recorder is a :class:`~scio.export.replay.Replay` and whose fitted
tensors are read from the buffers of a :class:`FittedState` module at each access. The
buffers are the exported module's: ``.to()`` moves and casts them, and ``torch.export``
sees them as buffers of the program. A nearest-neighbour
:class:`~scio.index.Index` becomes an :class:`ExactSearch` (a matrix product and a
``topk``, the same neighbours and distances).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from scio.index import Index
from scio.index.flat import FLT_MAX, TorchIndexFlatIP, TorchIndexFlatL2
from scio.index.index import _drop_self
from scio.utils.enums import IndexMetric

__all__ = ["APPROXIMATE_BACKENDS", "ExactSearch", "FittedState", "make_view"]

#: Index backends whose search is approximate: they have no exact exported equivalent.
APPROXIMATE_BACKENDS = ("faiss-ivf", "faiss-hnsw")

#: Attributes of a score that are not state (the recorder, timings).
_NOT_STATE = frozenset({"_rnet", "_timer"})


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ExactSearch(nn.Module):
    """The exact nearest-neighbour search of an :class:`~scio.index.Index`, its samples as
    buffers.

    Eagerly, searches run the torch index's own algorithm (same distances, same order of
    tied neighbours); in an exported graph, one matrix product and a ``topk`` (squared L2
    ``‖q‖² - 2 q·x + ‖x‖²`` clamped at 0, or the inner product): the same distances up to
    rounding. Missing neighbours are ``I = -1``, ``D = ±3.4028235e38`` as for the index.
    """

    backend = "torch"
    samples: Tensor
    sqnorms: Tensor

    def __init__(self, index: Index) -> None:
        super().__init__()
        self.metric = index.metric
        self.D_is_similarity = IndexMetric(index.metric) == IndexMetric.IP
        self.dim = index.dim
        samples = index.samples.detach()
        if not samples.is_floating_point():
            samples = samples.float()
        self.register_buffer("samples", samples.clone())
        sqnorms = getattr(getattr(index, "_torch", None), "_sqnorms", None)
        if not self.D_is_similarity:
            cdtype = _compute_dtype(samples.dtype)
            if sqnorms is None or len(sqnorms) != len(samples):
                sqnorms = samples.to(cdtype).square().sum(dim=1)
            self.register_buffer("sqnorms", sqnorms.detach().to(cdtype).clone())

    @property
    def ntotal(self) -> int:
        """Number of indexed samples."""
        return int(self.samples.shape[0])

    def search(self, samples: Tensor, k: int, *, self_query: bool = False) -> tuple[Tensor, Tensor]:
        """``(D, I)`` of the ``k`` nearest neighbours of each row of ``samples`` (see
        :meth:`scio.index.Index.search`)."""
        flat = samples.detach().reshape(samples.shape[0], -1)
        out_dtype = flat.dtype if flat.is_floating_point() else torch.float32
        kk = int(k) + bool(self_query)
        if torch.compiler.is_exporting():
            D, I = self._product_search(flat, kk)
        else:
            index = (TorchIndexFlatIP if self.D_is_similarity else TorchIndexFlatL2)(self.dim)
            index._data = self.samples
            index._sqnorms = None if self.D_is_similarity else self.sqnorms
            D, I = index.search(flat, kk)
        if self_query:
            D, I = _drop_self(D, I, int(k))
        return D.to(device=samples.device, dtype=out_dtype), I.to(samples.device)

    def _product_search(self, flat: Tensor, kk: int) -> tuple[Tensor, Tensor]:
        """One matrix product and a ``topk`` (the exported form of the search)."""
        data = self.samples
        cdtype = _compute_dtype(data.dtype)
        q = flat.to(device=data.device, dtype=cdtype)
        x = data.to(cdtype)
        m = min(kk, int(x.shape[0]))  # the bank's size is static
        ip = self.D_is_similarity
        filler = -FLT_MAX if ip else FLT_MAX
        if ip:
            values, ids = torch.mm(q.neg(), x.T).topk(m, dim=1, largest=False)
        else:
            costs = torch.addmm(self.sqnorms, q, x.T, alpha=-2)
            values, ids = costs.topk(m, dim=1, largest=False)
            values = (values + q.square().sum(dim=1, keepdim=True)).clamp(min=0)
        invalid = ~(values < FLT_MAX)
        D = values.neg() + 0.0 if ip else values
        D = D.masked_fill(invalid, filler)
        ids = ids.masked_fill(invalid, -1)
        if m < kk:
            D = torch.cat([D, D.new_full((D.shape[0], kk - m), filler)], dim=1)
            ids = torch.cat([ids, ids.new_full((ids.shape[0], kk - m), -1)], dim=1)
        return D, ids


class _Ref:
    """Where a fitted value lives in the state module: a buffer or a submodule."""

    __slots__ = ("module", "name")

    def __init__(self, name: str, module: bool) -> None:
        self.name = name
        self.module = module


class FittedState(nn.Module):
    """The fitted tensors of a score as buffers (nearest-neighbour indexes as
    :class:`ExactSearch` submodules); plain values are kept as they are.

    Raises:
        ValueError: an index uses an approximate backend (no exact equivalent).
    """

    def __init__(self, score: Any) -> None:
        super().__init__()
        self.__dict__["templates"] = {}
        self.__dict__["_count"] = 0
        for name, value in score.__dict__.items():
            if name in _NOT_STATE or name in type(score)._param_names:
                continue
            template = self._template(value, name)
            if template is not value:
                self.__dict__["templates"][name] = template

    def _template(self, value: Any, where: str) -> Any:
        """``value`` with tensors and indexes replaced by references to buffers/modules."""
        if isinstance(value, Tensor):
            key = self._key(where)
            self.register_buffer(key, value.detach())
            return _Ref(key, module=False)
        if isinstance(value, Index):
            if value.backend in APPROXIMATE_BACKENDS:
                msg = (
                    f"`{where}` is an approximate {value.backend!r} index: an exported score "
                    "searches exactly (a matrix product and a top-k), which would not give the "
                    "fitted score's neighbours. Refit with `index_backend='torch'` to export"
                )
                raise ValueError(msg)
            key = self._key(where)
            self.add_module(key, ExactSearch(value))
            return _Ref(key, module=True)
        if isinstance(value, tuple | list):
            items = [self._template(v, f"{where}[{i}]") for i, v in enumerate(value)]
            if all(a is b for a, b in zip(items, value)):
                return value
            return tuple(items) if isinstance(value, tuple) else items
        if isinstance(value, dict):
            entries = {k: self._template(v, f"{where}[{k!r}]") for k, v in value.items()}
            if all(entries[k] is v for k, v in value.items()):
                return value
            return entries
        return value

    def _key(self, where: str) -> str:
        self.__dict__["_count"] += 1
        stem = "".join(c if c.isalnum() else "_" for c in where).strip("_")
        return f"{stem}_{self.__dict__['_count']}"

    def read(self, name: str) -> Any:
        """The current value of fitted attribute ``name`` (current buffers and modules)."""
        return self._read(self.__dict__["templates"][name])

    def _read(self, template: Any) -> Any:
        if isinstance(template, _Ref):
            if template.module:
                return self._modules[template.name]
            return self._buffers[template.name]
        if isinstance(template, tuple):
            return tuple(self._read(t) for t in template)
        if isinstance(template, list):
            return [self._read(t) for t in template]
        if isinstance(template, dict):
            return {k: self._read(t) for k, t in template.items()}
        return template


def _reader(name: str) -> property:
    def read(self: Any) -> Any:
        return self.__dict__["_export_state"].read(name)

    read.__name__ = name
    return property(read, doc=f"Fitted ``{name}``, read from the exported module's buffers.")


_VIEW_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def make_view(score: Any, rnet: nn.Module, state: FittedState) -> Any:
    """An object running ``score``'s code with recorder ``rnet`` and the fitted tensors of
    ``state``; hyper-parameters and plain fitted values are copied (later changes to
    ``score`` do not reach it)."""
    cls = type(score)
    names = tuple(sorted(state.__dict__["templates"]))
    key = (cls, names)
    view_cls = _VIEW_CLASSES.get(key)
    if view_cls is None:
        namespace: dict[str, Any] = {name: _reader(name) for name in names}
        namespace["__module__"] = cls.__module__
        namespace["__qualname__"] = f"{cls.__qualname__}[exported]"
        meta: Any = type(cls)
        view_cls = meta(f"{cls.__name__}[exported]", (cls,), namespace)
        _VIEW_CLASSES[key] = view_cls
    view = object.__new__(view_cls)
    values = {k: v for k, v in score.__dict__.items() if k not in names and k not in _NOT_STATE}
    view.__dict__.update(values)
    view.__dict__["_rnet"] = rnet
    view.__dict__["_export_state"] = state
    return view
