"""Visual-word codebook: k-means training (faiss) and nearest-centroid quantization.

Quantizers (``method=`` of :func:`quantize`):

- ``"faiss"``: an exact ``IndexFlatL2`` search on the CPU, as asmk does (whichever faiss is importable:
  faiss-cpu, or a faiss-gpu build from conda; :func:`faiss_info` says which);
- ``"jax"``: a jitted, chunked exact search on a JAX device (a GPU when there is one), at full float32
  precision;
- ``"hnsw"``: approximate, faiss's HNSW graph over the centroids (CPU; docs/benchmarks.md has its agreement with
  exact search and its speed);
- ``"ivf"``: approximate, on the CPU: the words split into lists by k-means (:func:`word_lists`), each
  descriptor searched among the words of its ``n_probe`` nearest lists, the rows that probe a list multiplied
  with its words in one BLAS product (numba's kernel); docs/real_photos.md has its agreement and speed;
- ``"exact"``: ``"jax"`` when the device given, or JAX's default backend, is an accelerator, else ``"faiss"``
  (``"jax"`` on the CPU where no faiss is installed): never approximate;
- ``"auto"`` (default): as ``"exact"``, except that on the CPU :func:`choose_quantizer` picks ``"ivf"`` for
  codebooks of :data:`IVF_MIN_WORDS` to :data:`IVF_MAX_WORDS` words and ``"hnsw"`` for larger ones, of at most
  :data:`HNSW_MAX_DIM` dimensions (where they were measured faster than exact search at the same mAP); a GPU
  number given as ``device=`` where JAX has no GPU falls back to the exact CPU search.

Every quantizer gives each descriptor the same words whichever other descriptors are in the call: the words
come in the order of their exact squared distances (float64 of the float32 inputs, ties to the lower word id)
among the candidates the search found; see :func:`settle_words`. The exact quantizers therefore agree with
each other everywhere (not just up to float32 near-ties), and with faiss wherever faiss's float32 distances
are further apart than their rounding.

A :class:`Codebook` holds numpy centroids: making or loading one touches no JAX device (JAX starts only when a
computation needs it, see :mod:`jasmk.runtime`); the device copy and the faiss indexes over the centroids are
made once per centroid array and cached (centroid arrays are treated as immutable, as everywhere in jasmk).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernel, ivf, memory, validate
from . import progress as progress_mod

log = logging.getLogger(__name__)

_SIZE_SUFFIX = {"k": 1024, "M": 1024**2}

_faiss_said = False


def _faiss(purpose: str):
    """The importable faiss module (faiss-cpu from pip, or a faiss-gpu build from conda), said once at INFO.

    Raises:
        ImportError: no faiss at all, with what to install.
    """
    global _faiss_said
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f"{purpose} needs faiss: pip install faiss-cpu (or jasmk[faiss]), or keep the faiss-gpu "
                          f"your environment has from conda") from e
    if not _faiss_said:
        _faiss_said = True
        log.info("using %s", faiss_info())
    return faiss


def have_faiss() -> bool:
    """Whether some faiss (faiss-cpu or faiss-gpu) is importable."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


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
        centroids: ``[K, D] float32`` visual words (numpy; a JAX array is accepted too).
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

    def __repr__(self) -> str:
        return f"Codebook(size={self.size}, dim={self.dim}, size_param={self.size_param!r})"

    @classmethod
    def from_centroids(cls, centroids, *, size_param=None) -> "Codebook":
        c = validate.descriptors(centroids, name="centroids")
        if size_param is not None and parse_size(size_param) != c.shape[0]:
            raise ValueError(
                f"codebook size parameter {size_param!r} means {parse_size(size_param)} words "
                f"but the centroids have {c.shape[0]} rows"
            )
        return cls(centroids=np.ascontiguousarray(c, np.float32),
                   size_param=c.shape[0] if size_param is None else size_param)


MIN_PER_WORD = 39  # descriptors per word below which k-means is under-trained (faiss's threshold)


def warn_few_descriptors(n: int, k: int) -> bool:
    """Log a warning when ``n`` training descriptors are fewer than :data:`MIN_PER_WORD` per word for ``k``
    words (k-means still runs; the words are noisier). Returns whether it warned."""
    if n >= MIN_PER_WORD * k:
        return False
    fit = 1 << max(0, (n // MIN_PER_WORD).bit_length() - 1)
    log.warning("training %d visual words on %d descriptors (%.1f per word): k-means wants at least %d per word, "
                "so the words will be noisy; give at least %d descriptors, or use size=%d or fewer", k, n, n / k,
                MIN_PER_WORD, MIN_PER_WORD * k, fit)
    return True


def train_codebook(vecs, *, size, niter: int = 10, seed: int = 1234, verbose: bool = False,
                   method: str = "auto", progress: bool = False) -> Codebook:
    """Cluster ``vecs`` (``[N, D] float32``) into ``size`` visual words with k-means.

    ``method="faiss"`` (``"auto"`` when faiss is importable): faiss's k-means; the defaults (10 iterations,
    faiss's seed 1234) reproduce asmk 0.1.1's codebook for the same input. ``method="jax"`` (``"auto"`` without
    faiss): Lloyd's k-means in jitted JAX with faiss's recipe (seeded initial sample, at most 256 points per
    centroid, empty clusters split off the largest), so jasmk works where no faiss is installed; its centroids
    are a good codebook but not faiss's bits.

    ``progress=True`` shows a progress bar over the iterations (faiss: one iteration per call, each starting from
    the previous centroids, which gives the same centroids bit for bit as one call; tested). For the long
    trainings (64k words on millions of descriptors take hours on a CPU).
    """
    x = validate.descriptors(vecs, name="training descriptors")
    k = parse_size(size)
    if x.shape[0] < k:
        raise ValueError(f"cannot train {k} visual words from only {x.shape[0]} descriptors")
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    if method not in ("auto", "faiss", "jax"):
        raise ValueError(f"k-means method must be 'auto', 'faiss' or 'jax', got {method!r}")
    if method == "jax" or (method == "auto" and not have_faiss()):
        warn_few_descriptors(x.shape[0], k)
        log.info("training codebook with JAX k-means: %d words from %d x %d descriptors, %d iterations", k,
                 *x.shape, niter)
        return Codebook(centroids=kmeans_jax(x, k, niter=niter, seed=seed), size_param=size)
    warn_few_descriptors(x.shape[0], k)
    faiss = _faiss("training a codebook")
    log.info("training codebook: %d words from %d x %d descriptors, %d iterations", k, *x.shape, niter)

    def run(iterations, start):
        clus = faiss.Clustering(x.shape[1], k)
        clus.verbose = bool(verbose)
        clus.niter = int(iterations)
        clus.seed = int(seed)
        clus.min_points_per_centroid = 1  # faiss's own "please provide at least ..." line: jasmk warned above
        if start is not None:  # faiss starts from given centroids; its subsample and splits are seeded alike
            faiss.copy_array_to_vector(start.ravel(), clus.centroids)
        clus.train(x, faiss.IndexFlatL2(x.shape[1]))
        return faiss.vector_float_to_array(clus.centroids).reshape(k, x.shape[1])

    if not progress:
        centroids = run(niter, None)
    else:
        centroids = None
        with progress_mod.bar(int(niter), f"k-means, {k} words", enabled=True, unit="iterations") as counter:
            for _ in range(int(niter)):
                centroids = run(1, centroids)
                counter.update(1)
    return Codebook(centroids=np.ascontiguousarray(centroids, np.float32), size_param=size)


def kmeans_jax(x: np.ndarray, k: int, *, niter: int = 10, seed: int = 1234,
               max_points_per_centroid: int = 256) -> np.ndarray:
    """Lloyd's k-means on the default JAX device: ``[N, D] float32`` -> ``[k, D] float32`` centroids.

    Initial centroids are a seeded sample of the points; at most ``max_points_per_centroid * k`` points (a
    seeded sample) are clustered; an empty cluster takes a perturbed copy of the largest cluster's centroid.
    """
    rng = np.random.default_rng(seed)
    if x.shape[0] > max_points_per_centroid * k:
        x = x[np.sort(rng.choice(x.shape[0], max_points_per_centroid * k, replace=False))]
    cent = x[rng.choice(x.shape[0], k, replace=False)].copy()
    chunk = _chunk_rows(k, x.shape[0])
    rows = ivf.capacity(x.shape[0], minimum=1, multiple=chunk)
    padded = np.zeros((rows, x.shape[1]), np.float32)
    padded[: x.shape[0]] = x
    xd = jax.device_put(padded)
    valid = jnp.arange(rows) < x.shape[0]
    for it in range(int(niter)):
        words = quantize_jax(jnp.asarray(cent), xd, multiple_assignment=1, chunk_size=chunk)[:, 0]
        sums, counts = _cluster_sums(xd, words, valid, k=k)
        sums, counts = np.asarray(sums, np.float64), np.asarray(counts)
        nonempty = counts > 0
        cent[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        for j in np.flatnonzero(~nonempty):  # faiss's split: half of the largest cluster moves over
            big = int(np.argmax(counts))
            eps = np.float32(1 / 1024)
            cent[j] = cent[big] * (1 + eps)
            cent[big] = cent[big] * (1 - eps)
            counts[j] = counts[big] // 2
            counts[big] -= counts[j]
    return cent


@functools.partial(jax.jit, static_argnames=("k",))
def _cluster_sums(x, words, valid, *, k: int):
    """Per-cluster sums ``[k, D]`` and counts ``[k]`` of the valid rows of ``x`` (integer counts; the float sums
    are reduced per cluster by ``segment_sum``)."""
    w = jnp.where(valid, words, k)
    sums = jax.ops.segment_sum(x, w, num_segments=k + 1)[:k]
    counts = jax.ops.segment_sum(valid.astype(jnp.int32), w, num_segments=k + 1)[:k]
    return sums, counts


# Two words whose squared distances to a descriptor differ by less than TIE_EPS * (|x|^2 + |c|^2) may come in
# either order from the float32 searches: faiss (BLAS sgemm) and the JAX search (XLA's dot at HIGHEST precision)
# round the expansion |x|^2 + |c|^2 - 2 x.c differently, and the float32 rounding of that sum is a few ulps of
# its terms. :func:`quantize` settles such near-ties exactly (:func:`settle_words`); :func:`quantize_jax` does not.
TIE_EPS = 1e-5

CHUNK_BYTES = 64 * 2**20  # [chunk, K] float32 distances per jitted step of the JAX quantizer
SEARCH_ROWS = 1 << 16  # descriptors per faiss search (exact or HNSW) and its near-tie re-ranking
HNSW_M = 32  # graph degree of the approximate quantizer
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 16  # default search breadth (``ef_search=``); larger: slower and closer to exact (docs/benchmarks.md)
METHODS = ("auto", "exact", "faiss", "jax", "hnsw", "ivf")

# "ivf": the words split into lists (k-means over the words), each descriptor searched among the words of its
# IVF_PROBE nearest lists; the rows that probe a list are multiplied with its words in one BLAS product.
IVF_WORDS_PER_LIST = 128
IVF_PROBE = 12  # default ``n_probe=``; larger: slower and closer to exact
IVF_ROWS = 1 << 13  # descriptors per list search (its gathered rows and products stay a few MiB) ...
IVF_THREAD_ROWS = 256  # ... and at least this many per thread
IVF_KMEANS_ITERATIONS = 20
# "auto" on the CPU picks it for codebooks of IVF_MIN_WORDS to IVF_MAX_WORDS words (the sizes measured on real
# SIFT photos, see choose_quantizer), HNSW above.
IVF_MIN_WORDS = 4096
IVF_MAX_WORDS = 16384

# "auto" on the CPU (:func:`choose_quantizer`): HNSW from HNSW_MIN_WORDS words for descriptors of at most
# HNSW_MAX_DIM dimensions, exact search otherwise. Measured on real SIFT photos (128-d RootSIFT, about 2,900
# descriptors per query, 2-core Xeon, one thread): exact faiss took 18-21 / 43-49 / 153-156 ms per query at
# 1k / 4k / 16k words, HNSW (M 32, efConstruction 80, ef_search 16) 22-26 / 32-37 / 39-44 ms, at the same mAP
# (within 0.3 points). Higher dimensions (MASt3R's 1024-d features) were not measured on real data and stay
# exact (on 1024-d isotropic clusters HNSW missed half the words, docs/benchmarks.md).
HNSW_MIN_WORDS = 4096
HNSW_MAX_DIM = 256

# Row independence (:func:`settle_words`): a near-tie row whose first MA + 1 candidates do not hold every word
# within rounding of the MA-th is searched again for MA + RERANK_EXTRA (HNSW: re-ranked among those) ...
RERANK_EXTRA = 4
# ... and an exact one uses the search again from this many such rows (faiss's search of a few rows costs 10 to
# 40 times more per row than a large one on the CPU this was measured on), the host's float32 search below it.
WIDEN_MIN_ROWS = 512
_U32 = 2.0**-24  # float32 unit roundoff

_cache_lock = threading.Lock()
_device_cache: dict = {}  # (id(centroids), device) -> device copy; entries leave with their numpy array
_hnsw_cache: dict = {}  # (id(centroids), M, efConstruction) -> faiss index
_flat_cache: dict = {}  # (id(centroids), None) -> faiss IndexFlatL2 holding them
_lists_cache: dict = {}  # (id(centroids), (words per list, seed)) -> WordLists
_host_cache: dict = {}  # (id(centroids), None) -> (host float32 centroids, float64 squared norms, their max)


def _cached(cache: dict, centroids, key, make):
    """``make()`` cached under ``(id(centroids), key)`` for as long as ``centroids`` lives (weakref)."""
    full = (id(centroids), key)
    with _cache_lock:
        hit = cache.get(full)
    if hit is not None:
        return hit
    value = make()
    try:
        weakref.finalize(centroids, cache.pop, full, None)
    except TypeError:  # not weak-referenceable: do not cache
        return value
    with _cache_lock:
        cache[full] = value
    return value


def faiss_info() -> str:
    """Which faiss jasmk uses: its version, where it was imported from, and how many GPUs it sees."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    kind = "faiss-gpu" if hasattr(faiss, "StandardGpuResources") else "faiss-cpu"
    return f"{kind} {getattr(faiss, '__version__', '?')} from {os.path.dirname(faiss.__file__)} ({gpus} GPU(s))"


def accelerator_device(device=None):
    """The JAX device ``device`` names (a ``jax.Device``, or an int: that GPU), or the default device when it is
    an accelerator; None when the answer is the CPU. Starts JAX."""
    if device is None:
        d = jax.devices()[0]
        return None if d.platform == "cpu" else d
    if validate.is_int(device):
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if not gpus:
            return None
        if not 0 <= int(device) < len(gpus):
            raise ValueError(f"gpu {int(device)} does not exist: JAX sees {len(gpus)} GPU(s)")
        return gpus[int(device)]
    if isinstance(device, jax.Device):
        return None if device.platform == "cpu" else device
    raise ValueError(f"device must be None, a GPU number or a jax.Device, got {device!r}")


def device_centroids(centroids, device=None):
    """``centroids`` on ``device`` (default device if None), copied once per array and device."""
    if isinstance(centroids, jax.Array) and (device is None or device in centroids.devices()):
        return centroids
    arr = np.asarray(centroids)
    return _cached(_device_cache, centroids, device, lambda: jax.device_put(arr, device))


def hnsw_index(centroids, *, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION):
    """faiss ``IndexHNSWFlat`` over ``centroids`` (``[K, D] float32``), built once per array and cached."""
    faiss = _faiss("the approximate (HNSW) quantizer")

    def make():  # only on a cache miss: a device array is copied to the host once, not per call
        c = np.ascontiguousarray(np.asarray(centroids), dtype=np.float32)
        index = faiss.IndexHNSWFlat(c.shape[1], int(m))
        index.hnsw.efConstruction = int(ef_construction)
        log.debug("building an HNSW graph over %d centroids (M=%d, efConstruction=%d)", c.shape[0], m,
                  ef_construction)
        index.add(c)
        return index

    return _cached(_hnsw_cache, centroids, (int(m), int(ef_construction)), make)


@dataclasses.dataclass(frozen=True)
class WordLists:
    """The words of a codebook split into lists for the ``"ivf"`` quantizer (see :func:`word_lists`).

    Attributes:
        coarse: ``[L, D] float32`` list centres; ``coarse_t`` the same, ``[D, L]``.
        coarse_norm: ``[L] float32`` their squared norms; ``coarse_max`` the largest (a Python float).
        words: ``[K, D] float32`` the words, list by list; ``norms``: ``[K] float32`` their squared norms.
        starts: ``[L + 1] int64``: list ``l`` is ``words[starts[l]:starts[l + 1]]``.
        order: ``[K] int32``: the word id at each position of ``words``.
    """

    coarse: np.ndarray
    coarse_t: np.ndarray
    coarse_norm: np.ndarray
    coarse_max: float
    words: np.ndarray
    norms: np.ndarray
    starts: np.ndarray
    order: np.ndarray

    @property
    def n_lists(self) -> int:
        return int(self.starts.shape[0] - 1)


def _nearest_centre(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``[N] int64``: the nearest of ``centres`` ``[L, D]`` to each row of ``x`` ``[N, D]`` (float32, 8k rows at a
    time)."""
    c_sq = np.einsum("ld,ld->l", centres, centres)
    out = np.empty(x.shape[0], np.int64)
    for s in range(0, x.shape[0], 1 << 13):
        out[s:s + (1 << 13)] = np.argmin(c_sq[None, :] - 2 * (x[s:s + (1 << 13)] @ centres.T), axis=1)
    return out


def word_lists(centroids, *, words_per_list: int | None = None, seed: int = 1234) -> WordLists:
    """The lists of the ``"ivf"`` quantizer over ``centroids`` (``[K, D]``): Lloyd's k-means of the words into
    ``round(K / words_per_list)`` lists (default :data:`IVF_WORDS_PER_LIST`; a seeded sample of words to start,
    :data:`IVF_KMEANS_ITERATIONS` rounds, float64 means), each word in the list of its nearest centre. Made once
    per centroid array and cached, like the HNSW graph (0.1 s for 4k words, 0.5 s for 16k)."""
    if words_per_list is None:
        words_per_list = IVF_WORDS_PER_LIST

    def make():
        c = _host(centroids)[0]
        k = c.shape[0]
        n_lists = max(1, min(k, round(k / int(words_per_list))))
        rng = np.random.default_rng(seed)
        centres = c[np.sort(rng.choice(k, n_lists, replace=False))].copy()
        c64 = c.astype(np.float64)
        for _ in range(IVF_KMEANS_ITERATIONS):
            assign = _nearest_centre(c, centres)
            counts = np.bincount(assign, minlength=n_lists)
            sums = np.zeros((n_lists, c.shape[1]))
            np.add.at(sums, assign, c64)
            full = counts > 0
            centres[full] = (sums[full] / counts[full, None]).astype(np.float32)
            empty = np.flatnonzero(~full)
            if empty.size:  # an empty list restarts at words of the largest ones
                centres[empty] = c[rng.choice(np.flatnonzero(assign == np.argmax(counts)), empty.size)]
        assign = _nearest_centre(c, centres)
        order = np.argsort(assign, kind="stable")
        starts = np.searchsorted(assign[order], np.arange(n_lists + 1)).astype(np.int64)
        words = np.ascontiguousarray(c[order])
        norms = np.einsum("kd,kd->k", words, words)
        coarse_norm = np.einsum("ld,ld->l", centres, centres)
        log.debug("split %d words into %d lists (%d-%d words each)", k, n_lists, np.diff(starts).min(),
                  np.diff(starts).max())
        return WordLists(coarse=centres, coarse_t=np.ascontiguousarray(centres.T), coarse_norm=coarse_norm,
                         coarse_max=float(np.max(coarse_norm.astype(np.float64))), words=words, norms=norms,
                         starts=starts, order=order.astype(np.int32))

    return _cached(_lists_cache, centroids, (int(words_per_list), int(seed)), make)


def _settle_probes(x, lists: WordLists, dist, probes, rows, slack) -> None:
    """``probes[rows]``: the exact ``P`` nearest lists of near-tie rows (float64 distances, ties to the lower
    list id). Every list of float32 distance below the ``P``-th's minus ``slack`` is among them, none beyond it
    plus ``slack`` (``slack``: twice the rounding of any coarse distance); the band between is re-ranked."""
    n_probe = probes.shape[1]
    for r in rows:
        d = dist[r].astype(np.float64)
        edge = float(d[probes[r, n_probe - 1]])
        room = float(slack[r])
        sure = np.flatnonzero(d < edge - room)
        band = np.flatnonzero(np.abs(d - edge) <= room)
        exact_d = _exact_sq_dist(x[r:r + 1], lists.coarse, band[None, :])[0]
        pick = band[np.lexsort((band, exact_d))[:n_probe - sure.size]]
        probes[r] = np.concatenate([sure, pick])


def _list_words(lists: WordLists, probes: np.ndarray) -> np.ndarray:
    """``[n, c] int64``: every word of each row's probed lists (``probes`` ``[n, P]``), ``-1``-padded."""
    found = [np.concatenate([lists.order[lists.starts[lst]:lists.starts[lst + 1]] for lst in row]) for row in probes]
    ids = np.full((len(found), max(len(f) for f in found)), -1, np.int64)
    for i, f in enumerate(found):
        ids[i, :len(f)] = f
    return ids


def _threads() -> int:
    """Threads a CPU search may use: faiss's OpenMP count (``OMP_NUM_THREADS``) where faiss is there, else the
    CPUs this process may run on."""
    if have_faiss():
        return max(1, int(_faiss("the list search's thread count").omp_get_max_threads()))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _ivf_search(x: np.ndarray, centroids, ma: int, n_probe: int) -> np.ndarray:
    """``[n, MA] int32``: the words of the ``"ivf"`` quantizer, the same whatever other rows are in the call.

    Each row's candidates are the words of its ``n_probe`` nearest lists in exact order (near-ties of the
    coarse float32 distances settled in float64, :func:`_settle_probes`), so they depend on the row alone; its
    words are their MA nearest in exact order (:func:`settle_words` over the candidates). Blocks of at most
    :data:`IVF_ROWS` rows (and of at least :data:`IVF_THREAD_ROWS` per thread) run on :func:`_threads` threads.
    """
    lists = word_lists(centroids)
    n_probe = min(int(n_probe), lists.n_lists)
    n = x.shape[0]
    threads = max(1, min(_threads(), n // IVF_THREAD_ROWS))
    step = min(IVF_ROWS, -(-n // threads))
    out = np.empty((n, ma), np.int32)

    def run(s):
        out[s:s + step] = _ivf_block(x[s:s + step], lists, centroids, ma, n_probe)

    with cpu_kernel.one_blas_thread():  # many small products: one BLAS thread each, jasmk's threads over blocks
        if threads == 1 or n <= step:
            for s in range(0, n, step):
                run(s)
        else:
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, range(0, n, step)))  # the kernel releases the GIL
    return out


def _ivf_block(xs: np.ndarray, lists: WordLists, centroids, ma: int, n_probe: int) -> np.ndarray:
    """:func:`_ivf_search` of one block of rows."""
    n_words = lists.words.shape[0]
    eps = rounding_bound(xs.shape[1]) * (1 + 1e-3)
    xnorm = np.einsum("nd,nd->n", xs, xs)
    dist = xnorm[:, None] + lists.coarse_norm[None, :] - 2 * (xs @ lists.coarse_t)
    slack = 2 * eps * (xnorm.astype(np.float64) + lists.coarse_max) * (1 + 1e-3)  # twice any coarse rounding
    probes, near = cpu_kernel.nearest_lists(dist, n_probe, slack.astype(np.float32))
    if n_probe < lists.n_lists:
        _settle_probes(xs, lists, dist, probes, np.flatnonzero(near), slack)
    top_d, top_i = cpu_kernel.search_lists(xs, xnorm, probes, lists.words, lists.norms, lists.starts,
                                           min(ma + RERANK_EXTRA, n_words))
    ids = np.where(top_i >= 0, lists.order[np.maximum(top_i, 0)], -1)
    return settle_words(xs, centroids, top_d, ids, ma, pool=lambda rows: _list_words(lists, probes[rows]))


def _chunk_rows(k: int, n: int) -> int:
    """Descriptors per jitted step: a power of two with a ``[chunk, K]`` float32 table <= CHUNK_BYTES."""
    rows = max(CHUNK_BYTES // (4 * max(k, 1)), 8)
    rows = 1 << (rows.bit_length() - 1)
    return max(8, min(rows, 1 << max(int(n) - 1, 0).bit_length()))


def choose_quantizer(n_words: int, dim: int, backend: str = "cpu", *, exact: bool = False,
                     faiss_available: bool | None = None, kernel_available: bool | None = None) -> str:
    """The quantizer ``"auto"`` (and ``"exact"``) stands for: ``"jax"``, ``"faiss"``, ``"ivf"`` or ``"hnsw"``.

    On an accelerator (``backend`` a JAX platform other than ``"cpu"``): the jitted exact search, ``"jax"``. On
    the CPU, unless ``exact``, for descriptors of at most :data:`HNSW_MAX_DIM` dimensions: ``"ivf"`` for codebooks
    of :data:`IVF_MIN_WORDS` to :data:`IVF_MAX_WORDS` words (where numba's kernel runs), ``"hnsw"`` for larger
    ones; else exact faiss (``"jax"`` where no faiss is installed). The rule comes from real SIFT photos
    (docs/real_photos.md): at 4k and 16k words the list search agreed with exact search at least as often as
    HNSW and took about half its time; larger codebooks and higher dimensions were not measured with it.

    Args:
        n_words: codebook size ``K``.
        dim: descriptor dimension ``D``.
        backend: ``"cpu"``, or the platform of the accelerator the search would run on (``"gpu"``, ``"tpu"``...).
        exact: never approximate (``method="exact"``; asmk's assignment, as :mod:`jasmk.compat` needs).
        faiss_available: whether faiss is importable (None: look, :func:`have_faiss`).
        kernel_available: whether numba's kernel runs here (None: look, :func:`jasmk.core.cpu_kernel.available`).
    """
    if backend != "cpu":
        return "jax"
    approximate = not exact and int(dim) <= HNSW_MAX_DIM
    if approximate and IVF_MIN_WORDS <= int(n_words) <= IVF_MAX_WORDS:
        if kernel_available is None:
            kernel_available = cpu_kernel.available()
        if kernel_available:
            return "ivf"
    if not (have_faiss() if faiss_available is None else faiss_available):
        return "jax"
    if approximate and int(n_words) >= HNSW_MIN_WORDS:
        return "hnsw"
    return "faiss"


def rounding_bound(dim: int) -> float:
    """Bound on the rounding of a float32 squared distance, as a share of ``|x|^2 + |c|^2``.

    The expansion ``|x|^2 + |c|^2 - 2 x.c`` (faiss above 20 rows, the JAX search) sums ``D`` products three
    times, in any order, with or without FMA: each sum is off by at most ``D u`` times its absolute terms
    (``u = 2^-24``), ``|x.c| <= (|x|^2 + |c|^2) / 2``, and the two additions add a few ``u``; the direct
    ``sum (x - c)^2`` (faiss below 20 rows, HNSW) is off by at most ``(D + 1) u`` times a sum that is at most
    ``2 (|x|^2 + |c|^2)``. So ``(2 D + 16) u`` bounds both, with room.
    """
    return (2 * int(dim) + 16) * _U32


def _host(centroids):
    """``(centroids as host float32, their float64 squared norms [K], the largest)``, cached per array."""
    def make():
        c = np.ascontiguousarray(np.asarray(centroids), dtype=np.float32)
        norms = np.einsum("kd,kd->k", c.astype(np.float64), c.astype(np.float64))
        return c, norms, float(norms.max())

    return _cached(_host_cache, centroids, None, make)


def _exact_sq_dist(x: np.ndarray, cent: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64 squared distances ``[n, k]`` of the float32 rows ``x`` ``[n, D]`` to ``cent[ids]`` (``ids`` ``[n, k]``,
    ``-1``: none, distance inf), each (row, word) pair summed alone in a fixed order (so whatever other rows and
    words are in the call)."""
    out = np.full(ids.shape, np.inf)
    rows, cols = np.nonzero(ids >= 0)
    words = ids[rows, cols]
    step = max(1, 2**21 // x.shape[1])  # float64 temporaries of at most 16 MiB
    for s in range(0, rows.size, step):
        r, w = rows[s:s + step], words[s:s + step]
        diff = cent[w].astype(np.float64) - x[r].astype(np.float64)
        out[r, cols[s:s + step]] = np.square(diff).sum(axis=1)
    return out


def settle_words(x: np.ndarray, centroids, dist: np.ndarray, ids: np.ndarray, multiple_assignment: int, *,
                 exact: bool = True, widen=None, pool=None) -> np.ndarray:
    """The ``multiple_assignment`` words of each row from a float32 search's candidates, whatever other rows the
    search had: in the order of their exact squared distances (float64 of the float32 inputs; ties to the lower
    word id).

    A search's float32 distances depend on the other rows of its call (faiss loops over the rows below 20 and
    calls BLAS sgemm above, whose kernels and blocking change with the shape; XLA's dot with the chunk shape), so
    two words within that rounding of each other may come in either order. A row whose float32 distances (the
    MA nearest, and the next one) are further apart than :func:`rounding_bound` keeps the search's words, which
    are then in exact order. The other rows ("near-ties": 0.3 % of real RootSIFT descriptors at MA 1, 4 % at
    MA 5) are re-ranked in float64 over their "band", the words within twice the rounding of the MA-th one
    (every word beyond is farther, exactly): the candidates at hand when they hold all of it, else those of
    ``widen`` (MA + RERANK_EXTRA), else (an exact search) the band found by a float32 search of the row over every
    word on the host.

    Args:
        x: ``[N, D] float32`` descriptors.
        centroids: ``[K, D]`` words (numpy or JAX; its host copy and norms are cached per array).
        dist, ids: the search's ``[N, k]`` float32 squared distances and word ids (nearest first, ``-1``: none),
            ``k >= min(MA + 1, K)``.
        exact: the search was exact (its candidates are the nearest words). False (HNSW): a near-tie row is
            re-ranked among at most ``MA + RERANK_EXTRA`` of its candidates (``widen`` needed).
        widen: ``widen(rows, k)`` -> ``(dist, ids)``: the same search again, ``k`` candidates per row (an exact
            search uses it from :data:`WIDEN_MIN_ROWS` near-tie rows; fewer go to the host).
        pool: ``pool(row_indices)`` -> ``[r, c] int64`` (``-1``-padded): every candidate of those rows, for a
            search exact among candidates that depend on the row alone (``"ivf"``); a near-tie row whose band is
            not within its ``k`` candidates is re-ranked among all of them instead of over every word. A row left
            with fewer than MA words (its pool holds fewer) is re-ranked over every word.

    Returns:
        ``[N, MA] int32`` word ids, nearest first.
    """
    cent, cnorm, cmax = _host(centroids)
    n_words = cent.shape[0]
    ma = int(multiple_assignment)
    n, k = ids.shape
    if n == 0:
        return np.zeros((0, ma), np.int32)
    eps = rounding_bound(x.shape[1]) * (1 + 1e-3)  # the norms below are float32: a little more room
    xnorm = np.einsum("nd,nd->n", x, x).astype(np.float64)
    d = dist.astype(np.float64)
    valid = (ids >= 0) & np.isfinite(d)
    delta = eps * (xnorm[:, None] + cnorm[np.where(valid, ids, 0)])  # rounding bound of each candidate
    far = eps * (xnorm + cmax)  # ... and of any word
    # near-tie: two of the MA nearest, or the MA-th and any further word, closer than their rounding
    ok = np.all(valid[:, :min(ma + 1, n_words)], axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf where a row has fewer candidates: not ok already
        if ma > 1:
            ok &= np.all(d[:, 1:ma] - d[:, :ma - 1] > delta[:, 1:ma] + delta[:, :ma - 1], axis=1)
        if ma < n_words:
            ok &= d[:, ma] - d[:, ma - 1] > delta[:, ma - 1] + far
    out = np.array(ids[:, :ma], dtype=np.int32)  # a writable copy (JAX's host arrays are read-only)
    rows = near = np.flatnonzero(~ok)
    if rows.size == 0:
        return out
    # The band: the MA nearest have exact distances <= the MA-th float32 one + far, so a word of float32 distance
    # beyond that + 2 far is farther than all of them, exactly; the candidates are sorted, the band a prefix.
    cd, cand = d[rows], np.asarray(ids[rows], np.int64)
    edge = cd[:, ma - 1] + 2 * far[rows]
    inside = (k >= n_words) | (cd[:, -1] > edge)
    _settle_band(out, x, cent, rows[inside], cd[inside], cand[inside], edge[inside], ma)
    rows, edge = rows[~inside], edge[~inside]
    want = min(ma + RERANK_EXTRA, n_words)
    if rows.size and widen is not None and k < want and (not exact or rows.size >= WIDEN_MIN_ROWS):
        cd, cand = widen(x[rows], want)
        cd, cand = np.asarray(cd, np.float64), np.asarray(cand, np.int64)
        inside = (want >= n_words) | (cd[:, -1] > edge) | (not exact)  # approximate: its candidates
        _settle_band(out, x, cent, rows[inside], cd[inside], cand[inside], edge[inside], ma)
        rows, edge = rows[~inside], edge[~inside]
    if rows.size and not exact:  # approximate, no wider list: among its candidates
        out[rows] = _rerank(x[rows], cent, np.asarray(ids[rows], np.int64), ma)
    elif rows.size and pool is not None:  # exact among each row's own candidates
        out[rows] = _rerank(x[rows], cent, pool(rows), ma)
    elif rows.size:  # exact: the band of a float32 search over every word on the host
        out[rows] = _rerank(x[rows], cent, _band_search(x[rows], centroids, edge), ma)
    # fewer than MA words found (a row whose lists hold fewer; a band of fewer than MA words cannot be): every word
    short = near[np.any(out[near] < 0, axis=1)]
    if short.size:
        out[short] = _rerank(x[short], cent, np.arange(n_words, dtype=np.int64)[None, :], ma)
    return out


def _settle_band(out, x, cent, rows, cd, cand, edge, ma):
    """``out[rows]``: the MA of the candidates ``cand`` (sorted by ``cd``) up to ``edge``, re-ranked in float64."""
    if rows.size:
        out[rows] = _rerank(x[rows], cent, np.where(cd <= edge[:, None], cand, -1), ma)


def _band_search(x: np.ndarray, centroids, edge: np.ndarray) -> np.ndarray:
    """``[n, b] int64``: per row of ``x``, every word of float32 squared distance <= ``edge`` (computed on the host,
    within :func:`rounding_bound` of exact), ``-1``-padded."""
    cent, cnorm, _ = _host(centroids)
    c_sq = cnorm.astype(np.float32)
    found = []
    step = max(1, 2**22 // cent.shape[0])  # [rows, K] float32 of at most 16 MiB
    for s in range(0, x.shape[0], step):
        xs = x[s:s + step]
        dist = np.einsum("nd,nd->n", xs, xs)[:, None] + c_sq[None, :] - 2 * (xs @ cent.T)
        found.extend(np.flatnonzero(row) for row in dist <= edge[s:s + step, None])
    width = max(len(f) for f in found)
    ids = np.full((len(found), width), -1, np.int64)
    for i, f in enumerate(found):
        ids[i, :len(f)] = f
    log.debug("%d near-tie row(s) searched over every word (bands of up to %d words)", len(found), width)
    return ids


def _rerank(x: np.ndarray, cent: np.ndarray, cand: np.ndarray, ma: int) -> np.ndarray:
    """The ``ma`` candidates ``cand`` ``[n, k]`` nearest to each row of ``x`` in float64, ties to the lower id
    (``-1`` where a row has fewer than ``ma``)."""
    if cand.shape[1] < ma:  # fewer candidates than words wanted: -1 for the missing ones
        cand = np.pad(cand, ((0, 0), (0, ma - cand.shape[1])), constant_values=-1)
    exact_d = _exact_sq_dist(x, cent, np.broadcast_to(cand, (x.shape[0], cand.shape[1])))
    order = np.lexsort((np.broadcast_to(cand, exact_d.shape), exact_d), axis=-1)[:, :ma]
    return np.take_along_axis(np.broadcast_to(cand, exact_d.shape), order, axis=1).astype(np.int32)


def _by_blocks(search, x: np.ndarray, ma: int) -> np.ndarray:
    """``search(rows) -> [n, MA] int32`` over :data:`SEARCH_ROWS` rows of ``x`` at a time: the search's distance
    arrays and the near-tie re-ranking's temporaries stay bounded whatever ``N`` (a row's words do not depend on
    its block)."""
    n = x.shape[0]
    if n <= SEARCH_ROWS:
        return search(x)
    out = np.empty((n, ma), np.int32)
    for start in range(0, n, SEARCH_ROWS):
        out[start:start + SEARCH_ROWS] = search(x[start:start + SEARCH_ROWS])
    return out


def quantize(codebook, vecs, *, multiple_assignment: int = 1, method: str = "auto", device=None,
             ef_search: int = HNSW_EF_SEARCH, n_probe: int | None = None, chunk_size: int | None = None) -> np.ndarray:
    """Word ids of the ``multiple_assignment`` nearest centroids of each descriptor.

    Each descriptor's words depend on it and the codebook only, not on the other descriptors of the call (see
    :func:`settle_words`): quantizing images together or one at a time gives the same words.

    Args:
        codebook: a :class:`Codebook`, or ``[K, D]`` centroids (made a Codebook with
            :meth:`Codebook.from_centroids`; a C-contiguous float32 array keeps its cached search indexes).
        vecs: ``[N, D] float32`` descriptors.
        multiple_assignment: how many nearest words per descriptor (MA), ``1 <= MA <= K``.
        method: ``"auto"``, ``"exact"``, ``"faiss"``, ``"jax"`` or ``"hnsw"`` (see the module doc;
            ``"auto"`` is resolved by :func:`choose_quantizer`).
        device: for ``"jax"`` / ``"auto"`` / ``"exact"``: a ``jax.Device`` or a GPU number (None: JAX's default
            device). ``"auto"`` with a GPU number on a machine where JAX has no GPU uses exact faiss on the CPU.
        ef_search: HNSW search breadth (``"hnsw"`` only), at least ``multiple_assignment + RERANK_EXTRA``.
        n_probe: lists searched per descriptor (``"ivf"`` only; default :data:`IVF_PROBE`).
        chunk_size: descriptors per jitted step (``"jax"`` only; default: a ``[chunk, K]`` table of 64 MiB).

    Returns:
        ``[N, MA] int32`` word ids, nearest first.
    """
    if method not in METHODS:
        raise ValueError(f"quantizer method must be one of {METHODS}, got {method!r}")
    if not isinstance(codebook, Codebook):
        codebook = Codebook.from_centroids(codebook)
    x = validate.descriptors(vecs, name="descriptors", dim=codebook.dim)
    ma = validate.multiple_assignment(multiple_assignment, codebook.size)
    k_all = min(ma + RERANK_EXTRA, codebook.size)  # candidates of a near-tie row (see settle_words)
    if method in ("auto", "exact"):
        dev = accelerator_device(device)
        # a GPU asked for by number but absent (asmk's gpu_id): the exact CPU search it stands in for
        method = choose_quantizer(codebook.size, codebook.dim, "cpu" if dev is None else dev.platform,
                                  exact=method == "exact" or device is not None)
        device = dev
    elif method == "jax" and device is not None and not isinstance(device, jax.Device):
        device = accelerator_device(device) or jax.devices("cpu")[0]
    if method == "faiss":
        faiss = _faiss("the faiss quantizer")

        def make():  # once per centroid array (a 64k x 1024 codebook is 256 MiB to copy)
            index = faiss.IndexFlatL2(codebook.dim)
            index.add(_host(codebook.centroids)[0])
            return index

        index = _cached(_flat_cache, codebook.centroids, None, make)
    elif method == "hnsw":
        if not validate.is_int(ef_search) or ef_search < 1:
            raise ValueError(f"ef_search must be a positive int, got {ef_search!r}")
        index = hnsw_index(codebook.centroids)
        index.hnsw.efSearch = max(int(ef_search), k_all)  # the same for both searches: the same first words
    elif method == "ivf":
        n_probe = IVF_PROBE if n_probe is None else n_probe
        if not validate.is_int(n_probe) or n_probe < 1:
            raise ValueError(f"n_probe must be a positive int, got {n_probe!r}")
        if not cpu_kernel.available():
            raise ValueError("the 'ivf' quantizer needs numba (pip install numba); use method='hnsw' or 'exact'")
        return _ivf_search(x, codebook.centroids, ma, int(n_probe))
    if method in ("faiss", "hnsw"):
        def search(rows):
            dist, ids = index.search(rows, min(ma + 1, codebook.size))  # the next word tells a near-tie
            return settle_words(rows, codebook.centroids, dist, ids, ma, exact=method == "faiss", widen=index.search)

        return _by_blocks(search, x, ma)
    # "jax": pad the rows to a ladder so that varying descriptor counts reuse few compiled programs
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, ma), np.int32)
    if chunk_size is None:
        chunk = _chunk_rows(codebook.size, n)
    else:
        if not validate.is_int(chunk_size) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        chunk = min(int(chunk_size), max(n, 1))
    memory.require(4 * chunk * codebook.size + 4 * codebook.size * codebook.dim, "the JAX quantizer's distance table",
                   hint="pass a smaller chunk_size", device=True)
    rows = ivf.capacity(n, minimum=1, multiple=chunk)
    padded = np.zeros((rows, x.shape[1]), np.float32)
    padded[:n] = x
    cent = device_centroids(codebook.centroids, device)
    dist, ids = quantize_jax(cent, jax.device_put(padded, device), multiple_assignment=min(ma + 1, codebook.size),
                             chunk_size=chunk, return_distances=True)
    return settle_words(x, codebook.centroids, np.asarray(dist)[:n], np.asarray(ids)[:n], ma)


HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("multiple_assignment", "chunk_size", "return_distances"))
def quantize_jax(centroids, vecs, *, multiple_assignment: int, chunk_size: int = 4096,
                 return_distances: bool = False):
    """Jitted exact nearest-centroid search at full float32 precision (no TF32 on GPUs).

    Unlike :func:`quantize`, its words at float32 near-ties (:data:`TIE_EPS`) may depend on the shape of the
    call (the chunk, the padding); it is the traceable piece for programs jitted whole (``query_padded``).

    Args:
        centroids: ``[K, D] float32``, or a :class:`Codebook`.
        vecs: ``[N, D] float32``.
        return_distances: also return the float32 squared distances.

    Returns:
        ``[N, MA] int32`` word ids, nearest first (squared L2 distance expanded as faiss computes it; ties to
        the lower word id); with ``return_distances``, ``(distances [N, MA] float32, ids)``.
    """
    if isinstance(centroids, Codebook):
        centroids = centroids.centroids
    n, d = vecs.shape
    n_chunks = -(-n // chunk_size)
    padded = jnp.zeros((n_chunks * chunk_size, d), vecs.dtype).at[:n].set(vecs)
    c_sq = jnp.sum(centroids * centroids, axis=1)

    def one_chunk(x):
        dots = jnp.matmul(x, centroids.T, precision=HIGHEST)
        dist = jnp.sum(x * x, axis=1, keepdims=True) + c_sq[None, :] - 2.0 * dots
        neg, idx = jax.lax.top_k(-dist, multiple_assignment)
        return -neg, idx.astype(jnp.int32)

    dist, ids = jax.lax.map(one_chunk, padded.reshape(n_chunks, chunk_size, d))
    ids = ids.reshape(n_chunks * chunk_size, multiple_assignment)[:n]
    if return_distances:
        return dist.reshape(n_chunks * chunk_size, multiple_assignment)[:n], ids
    return ids


__all__ = ["CHUNK_BYTES", "Codebook", "HNSW_EF_CONSTRUCTION", "HNSW_EF_SEARCH", "HNSW_M", "HNSW_MAX_DIM",
           "HNSW_MIN_WORDS", "IVF_KMEANS_ITERATIONS", "IVF_MAX_WORDS", "IVF_MIN_WORDS", "IVF_PROBE", "IVF_ROWS",
           "IVF_THREAD_ROWS", "IVF_WORDS_PER_LIST", "METHODS", "MIN_PER_WORD", "RERANK_EXTRA", "SEARCH_ROWS",
           "TIE_EPS", "WIDEN_MIN_ROWS", "WordLists", "accelerator_device", "choose_quantizer", "device_centroids",
           "faiss_info", "have_faiss", "hnsw_index", "kmeans_jax", "parse_size", "quantize", "quantize_jax",
           "rounding_bound", "settle_words", "train_codebook", "warn_few_descriptors", "word_lists"]
