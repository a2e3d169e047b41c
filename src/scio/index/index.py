"""Exact ("flat") nearest-neighbour index: squared L2 distance or inner product.

The default backend is pure torch: the population lives on the device of the first added
samples and searches run there (tiled matrix products + ``topk``), so a GPU user never pays a
GPU → CPU → GPU round trip. ``faiss`` (``pip install scio[faiss]``) is an optional backend with
the same semantics, selected with ``backend="faiss"``.

Approximate backends (selected explicitly, faiss extra): ``"faiss-ivf"`` (``IndexIVFFlat``:
k-means coarse quantiser trained on the first added samples, ``nlist`` lists, ``nprobe``
visited per query; Jégou et al., "Product quantization for nearest neighbor search", TPAMI
2011) and ``"faiss-hnsw"`` (``IndexHNSWFlat``; Malkov & Yashunin, "Efficient and robust
approximate nearest neighbor search using Hierarchical Navigable Small World graphs", TPAMI
2018). They return true distances of possibly non-nearest neighbours; measure the loss with
:func:`recall_at_k` against the exact index. They do not support ``remove_ids``.

Semantics shared by both backends (they are faiss' ``IndexFlatL2`` / ``IndexFlatIP``):

* ``D`` is the **squared** L2 distance sorted ascending (``"l2"``) or the inner product sorted
  descending (``"ip"``); ``I`` holds the positions of the neighbours in the index.
* Missing neighbours (``k`` larger than the population, or candidates whose distance is NaN or
  not better than the filler) are reported as ``I = -1`` and ``D = 3.4028235e38`` (``"l2"``) or
  ``-3.4028235e38`` (``"ip"``), i.e. ``±FLT_MAX``, which becomes ``±inf`` in float16.
* Torch backend only: exactly tied distances are ordered by increasing id (the lower id is
  returned first, also when choosing which tied candidates make it into the ``k`` returned).
  faiss applies the same rule for ``"l2"`` but not always for ``"ip"``.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from scio.index.bank import ResidualBank
from scio.index.flat import (
    _DEFAULT_BLOCK_BYTES,
    FLT_MAX,
    TorchIndexFlat,
    TorchIndexFlatIP,
    TorchIndexFlatL2,
)
from scio.utils.enums import IndexMetric, IndexMetricLike

__all__ = [
    "FLT_MAX",
    "Index",
    "IndexBackend",
    "IndexType",
    "flatten_samples",
]

IndexBackend: TypeAlias = Literal["torch", "faiss", "faiss-ivf", "faiss-hnsw"]
_APPROXIMATE = ("faiss-ivf", "faiss-hnsw")
_IVF_TRAIN_PER_LIST = 64
IdsLike: TypeAlias = "Tensor | npt.ArrayLike"


def _import_faiss() -> ModuleType:
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = (
            "The 'faiss' index backend requires the optional dependency faiss: "
            "`pip install scio[faiss]` (or `pip install faiss-cpu`)"
        )
        raise ImportError(msg) from exc


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def IndexType(metric: IndexMetricLike, *, backend: IndexBackend = "torch") -> Any:  # noqa: N802
    """Flat index class for ``metric`` and ``backend``.

    ``torch``: :class:`TorchIndexFlatL2` / :class:`TorchIndexFlatIP`; ``faiss``:
    ``faiss.IndexFlatL2`` / ``faiss.IndexFlatIP``. Both are built as ``cls(dim)``.

    Raises:
        ValueError: ``metric`` is not a valid :class:`IndexMetric` or ``backend`` is unknown.
        NotImplementedError: the metric member has no flat index.
        ImportError: ``backend="faiss"`` without faiss installed.

    """
    member = IndexMetric(metric)
    if member not in (IndexMetric.L2, IndexMetric.IP):
        msg = f"Unsupported metric: {metric!r}"
        raise NotImplementedError(msg)
    if backend == "torch":
        return TorchIndexFlatL2 if member == IndexMetric.L2 else TorchIndexFlatIP
    if backend == "faiss":
        faiss = _import_faiss()
        return faiss.IndexFlatL2 if member == IndexMetric.L2 else faiss.IndexFlatIP
    msg = f"Unsupported index backend: {backend!r}. Supported: 'faiss', 'torch'"
    raise ValueError(msg)


def flatten_samples(samples: Tensor | npt.ArrayLike) -> Tensor:
    t = samples if isinstance(samples, Tensor) else torch.as_tensor(samples)
    if t.ndim == 0:
        msg = "Samples must be at least 1D, with samples along the first dimension (got scalar)"
        raise ValueError(msg)
    return t.detach().reshape(t.shape[0], math.prod(t.shape[1:]))


class Index:
    """Exact nearest-neighbour index (squared L2 distance or inner product).

    Args:
        dim: Flattened dimension of the samples.
        metric: ``"l2"`` (squared Euclidean distance, ascending) or ``"ip"`` (inner product,
            descending).
        backend: ``"torch"`` (default, searches on the population's device) or ``"faiss"``
            (requires ``pip install scio[faiss]``; CPU, float32; the raw index is the attribute
            ``faiss``); approximate: ``"faiss-ivf"`` or ``"faiss-hnsw"`` (see module doc).
        max_block_bytes: Torch backend only: memory bound of one block of the distance matrix.
        nlist: ``"faiss-ivf"``: number of lists (default ``min(4·√n, n / 39)`` for the ``n``
            samples of the first ``add``, which trains the quantiser on at most
            ``64 · nlist`` of them, a seeded subsample).
        nprobe: ``"faiss-ivf"``: lists visited per query.
        hnsw_m: ``"faiss-hnsw"``: graph degree.
        ef_search: ``"faiss-hnsw"``: search breadth.

    """

    faiss: Any

    def __init__(
        self,
        *,
        dim: int,
        metric: IndexMetricLike,
        backend: IndexBackend = "torch",
        max_block_bytes: int = _DEFAULT_BLOCK_BYTES,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 0:
            msg = f"`dim` must be a non-negative integer (got {dim!r})"
            raise ValueError(msg)
        approximate = backend in _APPROXIMATE
        index_cls = IndexType(metric, backend="faiss" if approximate else backend)
        self._dim = int(dim)
        self._metric = metric
        self._backend: IndexBackend = backend
        self._torch: TorchIndexFlat | None = None
        self._approx = {"nlist": nlist, "nprobe": nprobe, "hnsw_m": hnsw_m, "ef_search": ef_search}
        for name, value in self._approx.items():
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                msg = f"`{name}` must be a positive integer (got {value!r})"
                raise ValueError(msg)
        if backend == "faiss-ivf":
            self.faiss = None  # built and trained by the first ``add``
        elif backend == "faiss-hnsw":
            faiss = _import_faiss()
            self.faiss = faiss.IndexHNSWFlat(self._dim, hnsw_m, self._faiss_metric())
            self.faiss.hnsw.efSearch = ef_search
        elif backend == "faiss":
            self.faiss = index_cls(self._dim)
        else:
            self._torch = index_cls(self._dim, max_block_bytes=max_block_bytes)

    # --- properties --------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Flattened dimension of the samples."""
        return self._dim

    @property
    def metric(self) -> IndexMetricLike:
        """The metric, as given at construction."""
        return self._metric

    @property
    def backend(self) -> IndexBackend:
        """``"torch"`` or ``"faiss"``."""
        return self._backend

    @property
    def options(self) -> dict[str, Any]:
        """The construction options that :func:`scio.load_score` needs to rebuild the index:
        the backend and the approximate-search parameters."""
        return {"backend": self._backend, **self._approx}

    @property
    def samples(self) -> Tensor:
        """The indexed samples, ``(ntotal, dim)`` (as stored, decoded if coded; faiss: float32
        on CPU)."""
        if self._torch is not None:
            data = self._torch.data
            return data if data is not None else torch.empty(0, self._dim)
        if self.faiss is None:
            return torch.empty(0, self._dim)
        if self._backend == "faiss-ivf":
            self.faiss.make_direct_map()
        return torch.from_numpy(self.faiss.reconstruct_n(0, self.faiss.ntotal))

    @property
    def stored(self) -> Tensor | ResidualBank:
        """The indexed samples as stored: :attr:`samples`, or the coded
        :class:`~scio.index.bank.ResidualBank` of a torch index built from one."""
        if self._torch is not None:
            stored = self._torch.stored
            if stored is not None:
                return stored
        return self.samples

    @property
    def ntotal(self) -> int:
        """Number of indexed samples."""
        if self._torch is not None:
            return self._torch.ntotal
        return 0 if self.faiss is None else int(self.faiss.ntotal)

    @property
    def D_is_similarity(self) -> bool:  # noqa: N802
        """Whether ``D`` is a similarity (inner product) rather than a distance."""
        return IndexMetric(self._metric) == IndexMetric.IP

    def __repr__(self) -> str:
        return (
            f"Index(dim={self.dim}, metric={str(self._metric)!r}, ntotal={self.ntotal}, "
            f"backend={self._backend!r})"
        )

    # --- operations --------------------------------------------------------------------------

    def _check_dim(self, flat: Tensor) -> None:
        if flat.shape[1] != self._dim:
            msg = (
                f"Expected samples of flattened dimension {self._dim} "
                f"(got {flat.shape[1]}, from shape {tuple(flat.shape)})"
            )
            raise ValueError(msg)

    def add(self, samples: Tensor | ResidualBank) -> None:
        """Add ``samples`` (flattened to ``(n, -1)``) at the end of the index.

        A :class:`~scio.index.bank.ResidualBank` (half-precision bank) stays coded in
        the torch backend; faiss backends store it decoded (float32).
        """
        if isinstance(samples, ResidualBank):
            self._check_dim(samples.residuals)
            if self._torch is not None:
                with torch.no_grad():
                    self._torch.add(samples)
                return
            flat = samples.decode()
        else:
            flat = flatten_samples(samples)
            self._check_dim(flat)
        if self._torch is not None:
            with torch.no_grad():
                self._torch.add(flat)
        else:
            arr = np.ascontiguousarray(flat.cpu().numpy(), dtype=np.float32)
            if self.faiss is None:
                self.faiss = self._trained_ivf(arr)
            self.faiss.add(arr)

    def _faiss_metric(self) -> int:
        faiss = _import_faiss()
        ip = IndexMetric(self._metric) == IndexMetric.IP
        return int(faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)

    def _trained_ivf(self, arr: np.ndarray) -> Any:
        """An ``IndexIVFFlat`` whose coarse quantiser is trained on ``arr``."""
        faiss = _import_faiss()
        n = len(arr)
        nlist = self._approx["nlist"] or max(1, min(int(4 * math.sqrt(n)), n // 39))
        if nlist > n:
            msg = f"`nlist` must not exceed the {n} samples of the first `add` (got {nlist})"
            raise ValueError(msg)
        quantizer = (
            faiss.IndexFlatIP(self._dim) if self._faiss_metric() else faiss.IndexFlatL2(self._dim)
        )
        index = faiss.IndexIVFFlat(quantizer, self._dim, nlist, self._faiss_metric())
        if n > _IVF_TRAIN_PER_LIST * nlist:  # k-means on a seeded subsample (faiss' practice)
            rows = np.random.default_rng(0).choice(n, _IVF_TRAIN_PER_LIST * nlist, replace=False)
            index.train(arr[np.sort(rows)])
        else:
            index.train(arr)
        index.nprobe = min(int(self._approx["nprobe"] or 1), nlist)
        self._quantizer = quantizer  # keep the Python owner of the quantiser alive
        return index

    def remove_ids(self, ids: IdsLike) -> int:
        """Remove the samples at the current positions ``ids``; return how many were removed.

        The remaining samples keep their relative order (their positions shift down).
        Out-of-range or duplicate ids are ignored.
        """
        ids_t = (
            ids.detach() if isinstance(ids, Tensor) else torch.as_tensor(np.asarray(ids))
        ).reshape(-1)
        if self._torch is not None:
            return self._torch.remove_ids(ids_t)
        if self._backend in _APPROXIMATE:
            msg = f"`remove_ids` is not supported by the approximate {self._backend!r} backend"
            raise NotImplementedError(msg)
        arr = np.ascontiguousarray(ids_t.cpu().numpy(), dtype=np.int64)
        return int(self.faiss.remove_ids(arr))

    def search(self, samples: Tensor, k: int, *, self_query: bool = False) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest neighbours of each sample.

        Args:
            samples: Queries, flattened to ``(n, -1)``.
            k: Number of neighbours.
            self_query: The index was built from exactly these samples in the same order, and
                each query must not be its own neighbour: ``k + 1`` neighbours are searched,
                then the column where ``I`` equals the row index is dropped if it is among the
                first ``k``, else the last column.

        Returns:
            ``(D, I)`` of shape ``(n, k)``: ``D`` (squared L2 ascending, or inner product
            descending) with the queries' dtype and device, ``I`` int64 on the queries' device.
            Missing neighbours: ``I = -1``, ``D = ±3.4028235e38``.

        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            msg = f"`k` must be a non-negative integer (got {k!r})"
            raise ValueError(msg)
        k = int(k)
        flat = flatten_samples(samples)
        self._check_dim(flat)
        device = flat.device
        out_dtype = flat.dtype if flat.is_floating_point() else torch.float32
        n, kk = flat.shape[0], k + bool(self_query)
        if self._torch is not None:
            with torch.no_grad():
                D, I = self._torch.search(flat, kk)
        elif n == 0 or kk == 0 or self.faiss is None:
            D = torch.full((n, kk), -FLT_MAX if self.D_is_similarity else FLT_MAX)
            I = torch.full((n, kk), -1, dtype=torch.int64)
        else:
            arr = np.ascontiguousarray(flat.cpu().numpy(), dtype=np.float32)
            D_np, I_np = self.faiss.search(arr, kk)
            D, I = torch.from_numpy(D_np), torch.from_numpy(I_np).to(torch.int64)
        if self_query:
            D, I = _drop_self(D, I, k)
        return D.to(device=device, dtype=out_dtype), I.to(device=device)


def _drop_self(D: Tensor, I: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Drop, per row, the column where ``I`` is the row index (among the first ``k``) or else
    the last one."""
    n = I.shape[0]
    if k == 0:
        return D[:, :0], I[:, :0]
    rows = torch.arange(n, device=I.device).unsqueeze(1)
    match = I[:, :k] == rows
    pos = torch.where(match.any(dim=1), match.to(torch.int8).argmax(dim=1), k)
    keep = torch.arange(k + 1, device=I.device).unsqueeze(0) != pos.unsqueeze(1)
    return D[keep].reshape(n, k), I[keep].reshape(n, k)
