"""Reference import path of the nearest-neighbour index (it lives in :mod:`scio.index`)."""

from scio.index.groups import IndexNest, make_indexes
from scio.index.index import FLT_MAX, Index, IndexBackend, IndexType

__all__ = ["FLT_MAX", "Index", "IndexBackend", "IndexNest", "IndexType", "make_indexes"]
