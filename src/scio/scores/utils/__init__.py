"""Nearest-neighbour index and tensor helpers used by the scores."""

from scio.scores.utils.index import Index, make_indexes
from scio.scores.utils.utils import (
    ak_lpe,
    batched_grad,
    dirmult_surprise,
    fgm_direction,
    get_aggregator,
    kldiv,
    knn_label_count,
    multinomial_test,
    normalize_samples,
    torch_quantile,
)

__all__ = [
    "Index",
    "ak_lpe",
    "batched_grad",
    "dirmult_surprise",
    "fgm_direction",
    "get_aggregator",
    "kldiv",
    "knn_label_count",
    "make_indexes",
    "multinomial_test",
    "normalize_samples",
    "torch_quantile",
]
