"""Nearest-neighbour index and tensor helpers used by the scores."""

from scio.index import Index, make_indexes
from scio.scores.utils.neighbours import ak_lpe, knn_label_count
from scio.scores.utils.stats import dirmult_surprise, kldiv, multinomial_test
from scio.scores.utils.utils import (
    batched_grad,
    fgm_direction,
    get_aggregator,
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
