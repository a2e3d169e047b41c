"""Reference import path of the nearest-neighbour index (it lives in :mod:`scio.index`)."""

from scio.index.index import FLT_MAX, Index, IndexBackend, IndexNest, IndexType, make_indexes

__all__ = ["FLT_MAX", "Index", "IndexBackend", "IndexNest", "IndexType", "make_indexes"]
