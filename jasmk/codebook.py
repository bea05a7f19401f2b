"""Visual-word codebook: k-means training (faiss) and nearest-centroid quantization.

Two quantizers give the same word ids: ``"faiss"`` (an exact ``IndexFlatL2`` search, as asmk does)
and ``"jax"`` (a jitted, chunked exact search that runs on any JAX backend).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from . import validate

log = logging.getLogger(__name__)

_SIZE_SUFFIX = {"k": 1024, "M": 1024**2}


def parse_size(size) -> int:
    """Number of visual words for a codebook ``size`` parameter: an int, or a string like ``"64k"``/``"1M"``."""
    if isinstance(size, (bool, np.bool_)):
        raise ValueError(f"codebook size must be an int or a string like '64k', got {size!r}")
    if isinstance(size, (int, np.integer)):
        n = int(size)
    elif isinstance(size, str):
        s = size.strip()
        try:
            n = int(s[:-1]) * _SIZE_SUFFIX[s[-1]] if s and s[-1] in _SIZE_SUFFIX else int(s)
        except ValueError:
            raise ValueError(f"codebook size {size!r} is not an int or a string like '64k' or '1M'") from None
    else:
        raise ValueError(f"codebook size must be an int or a string like '64k', got {type(size).__name__}")
    if n < 1:
        raise ValueError(f"codebook size must be positive, got {size!r}")
    return n


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["centroids"], meta_fields=["size_param"]
)
@dataclasses.dataclass(frozen=True)
class Codebook:
    """A trained codebook.

    Attributes:
        centroids: ``[K, D] float32`` visual words.
        size_param: the ``size`` parameter it was made with (``1024``, ``"64k"``...), kept for asmk's params schema.
    """

    centroids: jax.Array
    size_param: object = None

    @property
    def size(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @classmethod
    def from_centroids(cls, centroids, *, size_param=None) -> "Codebook":
        c = validate.descriptors(centroids, name="centroids")
        if size_param is not None and parse_size(size_param) != c.shape[0]:
            raise ValueError(
                f"codebook size parameter {size_param!r} means {parse_size(size_param)} words "
                f"but the centroids have {c.shape[0]} rows"
            )
        return cls(centroids=jnp.asarray(c), size_param=c.shape[0] if size_param is None else size_param)


def train_codebook(vecs, *, size, niter: int = 10, seed: int = 1234, verbose: bool = False) -> Codebook:
    """Cluster ``vecs`` (``[N, D] float32``) into ``size`` visual words with faiss k-means.

    The defaults (10 iterations, faiss's seed 1234) reproduce asmk 0.1.1's codebook for the same input.
    """
    import faiss

    x = validate.descriptors(vecs, name="training descriptors")
    k = parse_size(size)
    if x.shape[0] < k:
        raise ValueError(f"cannot train {k} visual words from only {x.shape[0]} descriptors")
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    clus = faiss.Clustering(x.shape[1], k)
    clus.verbose = bool(verbose)
    clus.niter = int(niter)
    clus.seed = int(seed)
    index = faiss.IndexFlatL2(x.shape[1])
    log.info("training codebook: %d words from %d x %d descriptors, %d iterations", k, *x.shape, niter)
    clus.train(x, index)
    centroids = faiss.vector_float_to_array(clus.centroids).reshape(k, x.shape[1])
    return Codebook(centroids=jnp.asarray(centroids), size_param=size)


def quantize(codebook: Codebook, vecs, *, multiple_assignment: int = 1, method: str = "faiss",
             chunk_size: int = 4096) -> np.ndarray:
    """Word ids of the ``multiple_assignment`` nearest centroids of each descriptor.

    Args:
        codebook: the codebook (``[K, D]`` centroids).
        vecs: ``[N, D] float32`` descriptors.
        multiple_assignment: how many nearest words per descriptor (MA), ``1 <= MA <= K``.
        method: ``"faiss"`` (exact flat L2, like asmk) or ``"jax"`` (jitted chunked search).
        chunk_size: descriptors per jitted chunk (``"jax"`` only).

    Returns:
        ``[N, MA] int32`` word ids, nearest first.
    """
    x = validate.descriptors(vecs, name="descriptors", dim=codebook.dim)
    ma = validate.multiple_assignment(multiple_assignment, codebook.size)
    if method == "faiss":
        import faiss

        index = faiss.IndexFlatL2(codebook.dim)
        index.add(np.ascontiguousarray(np.asarray(codebook.centroids), dtype=np.float32))
        _, ids = index.search(x, ma)
        return ids.astype(np.int32)
    if method == "jax":
        return np.asarray(quantize_jax(codebook.centroids, jnp.asarray(x), multiple_assignment=ma,
                                       chunk_size=min(int(chunk_size), max(x.shape[0], 1))))
    raise ValueError(f"quantizer method must be 'faiss' or 'jax', got {method!r}")


@functools.partial(jax.jit, static_argnames=("multiple_assignment", "chunk_size"))
def quantize_jax(centroids, vecs, *, multiple_assignment: int, chunk_size: int = 4096):
    """Jitted exact nearest-centroid search.

    Args:
        centroids: ``[K, D] float32``.
        vecs: ``[N, D] float32``.

    Returns:
        ``[N, MA] int32`` word ids, nearest first (squared L2 distance as faiss computes it).
    """
    n, d = vecs.shape
    n_chunks = -(-n // chunk_size)
    padded = jnp.zeros((n_chunks * chunk_size, d), vecs.dtype).at[:n].set(vecs)
    c_sq = jnp.sum(centroids * centroids, axis=1)

    def one_chunk(x):
        dist = jnp.sum(x * x, axis=1, keepdims=True) + c_sq[None, :] - 2.0 * (x @ centroids.T)
        _, idx = jax.lax.top_k(-dist, multiple_assignment)
        return idx.astype(jnp.int32)

    ids = jax.lax.map(one_chunk, padded.reshape(n_chunks, chunk_size, d))
    return ids.reshape(n_chunks * chunk_size, multiple_assignment)[:n]
