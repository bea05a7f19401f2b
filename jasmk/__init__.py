"""jasmk: ASMK (Aggregated Selective Match Kernels) image retrieval in JAX.

Main entry points::

    index = jasmk.build_index(feats, ids)               # trains a codebook on a sample (quick start)
    cb = jasmk.train_codebook(train_feats, size="64k")  # or one trained on separate data (benchmarks)
    index = jasmk.build_index(feats, ids, codebook=cb)
    result = jasmk.query(index, qfeats, qids)          # ids, ranks, scores
    S = jasmk.score_matrix(index, feats, ids)           # [n_query, n_db] dense scores
    jasmk.save_index("idx", index); index = jasmk.load_index("idx")

Layers: :mod:`jasmk.core` (the engine: pure functions on arrays), :mod:`jasmk.storage` (what is written and
read), :mod:`jasmk.head` (the Flax retrieval head), :mod:`jasmk.shard` (an index over a JAX mesh), and the
integrations :mod:`jasmk.compat` (asmk's API), :mod:`jasmk.mast3r` (MASt3R's Retriever), :mod:`jasmk.pairs`,
:mod:`jasmk.evaluation`, :mod:`jasmk.show` and :mod:`jasmk.cli`.
"""

import logging

from .api import (
                  QueryResult,
                  add_images,
                  aggregate_images,
                  build_index,
                  empty_index,
                  query,
                  query_aggregated,
                  query_padded,
                  reserve,
                  score_matrix,
                  score_matrix_aggregated,
)
from .core.aggregate import Aggregated
from .core.codebook import Codebook, parse_size, quantize, quantize_jax, train_codebook
from .core.ivf import Index
from .logs import configure_logging
from .storage.checkpoint import load_codebook, load_index, save_codebook, save_index

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.2.0"

__all__ = [
    "Aggregated", "Codebook", "Index", "QueryResult", "__version__", "add_images", "aggregate_images", "build_index",
    "configure_logging", "empty_index", "load_codebook", "load_index", "parse_size", "quantize", "quantize_jax",
    "query", "query_aggregated", "query_padded", "reserve", "save_codebook", "save_index", "score_matrix",
    "score_matrix_aggregated", "train_codebook",
]
