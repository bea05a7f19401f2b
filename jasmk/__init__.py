"""jasmk: ASMK (Aggregated Selective Match Kernels) image retrieval in JAX.

Main entry points::

    index = jasmk.build_index(feats, ids)               # trains a codebook on a sample (quick start)
    cb = jasmk.train_codebook(train_feats, size="64k")  # or one trained on separate data (benchmarks)
    index = jasmk.build_index(feats, ids, codebook=cb)
    result = jasmk.query(index, qfeats, qids)          # ids, ranks, scores
    S = jasmk.score_matrix(index, feats, ids)           # [n_query, n_db] dense scores

Submodules loaded on use: ``jasmk.mast3r`` (MASt3R's Retriever without asmk), ``jasmk.shard`` (an index over a
JAX mesh), ``jasmk.show`` (pictures), ``jasmk.pairs``, ``jasmk.eval``, ``jasmk.head``, ``jasmk.compat``.
"""

import logging

from .core.aggregate import Aggregated
from .api import (QueryResult, add_images, aggregate_images, build_index, query, query_aggregated, query_padded,
                  score_matrix, score_matrix_aggregated)
from .core.codebook import Codebook, parse_size, quantize, quantize_jax, train_codebook
from .core.ivf import Index

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "Aggregated", "Codebook", "Index", "QueryResult", "add_images", "aggregate_images", "build_index",
    "parse_size", "quantize", "quantize_jax", "query", "query_aggregated", "query_padded", "score_matrix", "score_matrix_aggregated", "train_codebook",
]
