"""Nearest-neighbour search and the banks and sketches it searches (pure tensors).

:class:`~scio.index.index.Index` is an exact index in torch on the data's own device
(:mod:`~scio.index.flat`: tiled matrix products and ``topk``) with optional faiss backends;
:mod:`~scio.index.bank` stores half-precision banks as coded residuals;
:mod:`~scio.index.sketch` is the mergeable quantile summary used for thresholds.
"""

from scio.index.groups import IndexNest, make_indexes, recall_at_k
from scio.index.index import FLT_MAX, Index, IndexType

__all__ = ["FLT_MAX", "Index", "IndexNest", "IndexType", "make_indexes", "recall_at_k"]
