"""Compiled CPU kernel (numba) for the sparse ASMK* path: shared posting reads, one pass per batch.

XLA on the CPU spends most of the sparse path's time in gathers and scatters per (query row, posting) pair.
This kernel walks the batch's distinct words in ascending order; for each word and each query row holding it,
it runs over the word's postings (popcount of XOR, kernel table, idf weight), which stay in L1 for the word's
few rows. It computes the same float32 terms as the XLA kernels of :mod:`jasmk.score` and adds them in the
same fixed point (``floor(term * 2**40)``, here one int64 per (image, query) instead of four int32 limbs), then
rebuilds the float32 sum from the same 16-bit digits in the same order: its scores are bit-identical to the XLA
kernels', whatever the batch, the row order or the kernel chosen for another segment.

numba is optional at import time: :func:`available` says whether the kernel can run; the engine falls back to
the XLA sparse kernel without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading

import numpy as np

log = logging.getLogger(__name__)


def cache_dir() -> str:
    """Where the compiled kernel is kept between processes: ``$JASMK_CACHE_DIR/numba``, else
    ``$XDG_CACHE_HOME/jasmk/numba``, else ``~/.cache/jasmk/numba`` (never the package's folder, which may be
    read-only and is shared by every user of an install)."""
    root = os.environ.get("JASMK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jasmk")
    return os.path.join(root, "numba")


@functools.lru_cache(maxsize=1)
def _kernels():
    """The scoring kernel, compiled once per machine: numba caches it in :func:`cache_dir` and later processes
    load it from there."""
    import numba

    folder = cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # numba then picks a cache place itself, or compiles in every process
        log.debug("the kernel cache folder %s cannot be written", folder)
    saved = numba.config.CACHE_DIR
    if writable:
        numba.config.CACHE_DIR = folder  # read when the kernel's cache is set up, at its import: ours only
    try:
        from . import numba_kernel
    finally:
        numba.config.CACHE_DIR = saved
    return numba_kernel


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether numba is importable and the kernel compiles here."""
    try:
        _kernels()
        return True
    except Exception as exc:  # ImportError, or a numba/LLVM that cannot build the kernel
        log.debug("numba CPU kernel unavailable: %s", exc)
        return False


CACHE_BYTES = 1 << 20  # the accumulator of one pass stays within this (cache-resident)


def _word_runs(words: np.ndarray):
    """``(distinct words [U] int32, row ranges [U + 1] int64)`` of rows sorted by word."""
    if words.shape[0] == 0:
        return np.zeros(0, np.int32), np.zeros(1, np.int64)
    bounds = np.flatnonzero(np.diff(words)) + 1
    ustart = np.concatenate([[0], bounds, [words.shape[0]]]).astype(np.int64)
    return words[ustart[:-1]].astype(np.int32), ustart


def score_segment(hseg, q_vecs, q_words, q_slots, q_weight, ktable, q_scale, *, n_queries: int) -> np.ndarray:
    """Scores of a batch against one segment (host arrays of :class:`jasmk.ivf.HostSegment`).

    The accumulator's random writes dominate the cost once it leaves the cache, so the batch is cut into
    sub-batches of queries whose ``[I, b]`` float64 accumulator fits in :data:`CACHE_BYTES` (one query at a
    time for the largest segments); each sub-batch is one pass over the postings of its words.

    Args:
        hseg: host views of the segment.
        q_vecs: ``[R, W] uint32`` query rows sorted by word (stable); q_words: ``[R] int32`` their words;
            q_slots: ``[R] int32`` their query slot; q_weight: ``[R] float32`` idf of their word.
        ktable: ``[bits + 1] float32`` kernel table; q_scale: ``[B] float32`` query normalization.
        n_queries: ``B``.

    Returns:
        ``[B, I] float32`` scores (-inf on the padding image slots), as :func:`jasmk.score.dense_segment`.
    """
    score = _kernels().score
    i_cap = hseg.norm_factor.shape[0]
    vecs = hseg.vecs
    if vecs.shape[1] % 2 == 0 and vecs.flags.c_contiguous and q_vecs.flags.c_contiguous:
        vecs, q_vecs = vecs.view(np.uint64), q_vecs.view(np.uint64)  # the same bits, half the popcounts
    sub = int(max(1, min(n_queries, CACHE_BYTES // (i_cap * 8))))
    out = np.empty((n_queries, i_cap), np.float32)
    for s0 in range(0, n_queries, sub):
        s1 = min(n_queries, s0 + sub)
        if sub < n_queries:
            m = (q_slots >= s0) & (q_slots < s1)
            qv, qw, qs, qwt = q_vecs[m], q_words[m], q_slots[m] - s0, q_weight[m]
        else:
            qv, qw, qs, qwt = q_vecs, q_words, q_slots, q_weight
        uwords, ustart = _word_runs(qw)
        score(vecs, hseg.images, hseg.offsets, uwords, ustart, qv, qs, qwt, ktable, hseg.scale, q_scale[s0:s1],
              np.int64(hseg.n_images), out[s0:s1])
    return out

def cache_stats() -> tuple[int, int]:
    """``(signatures loaded from the cache, signatures compiled)`` of the compiled kernels' entry points (scoring
    and aggregation) in this process."""
    mod = _kernels()
    hits = misses = 0
    for fn in (mod.score, mod.aggregate_binary, mod.nearest_lists, mod.search_lists):
        hits += len(fn.stats.cache_hits)
        misses += len(fn.stats.cache_misses)
    return hits, misses


def aggregate_binary(vecs, centroids, desc, words, starts, sizes, width: int) -> np.ndarray:
    """The compiled twin of the summing and packing loop of :func:`jasmk.core.aggregate.aggregate_host` (same
    bits): ``[cells, width] uint32`` codes (see :func:`jasmk.core.numba_kernel.aggregate_binary`)."""
    out = np.empty((starts.shape[0], width), np.uint32)
    _kernels().aggregate_binary(np.ascontiguousarray(vecs, np.float32), np.ascontiguousarray(centroids, np.float32),
                                desc.astype(np.int64), words.astype(np.int64), starts.astype(np.int64),
                                sizes.astype(np.int64), out)
    return out


_blas_lock = threading.Lock()
_blas_state = {"users": 0, "saved": []}


@functools.lru_cache(maxsize=1)
def _openblas_pools() -> tuple:
    """``(get_num_threads, set_num_threads)`` of every OpenBLAS loaded in this process (numpy's, and scipy's,
    which numba's ``np.dot`` calls), found in ``/proc/self/maps``; empty where there is none or no such file."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS numba's np.dot calls: loaded before the scan)

        with open("/proc/self/maps") as handle:
            paths = sorted({line.split()[-1] for line in handle if "openblas" in line.lower() and "/" in line})
    except (ImportError, OSError):
        return ()
    pools = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("openblas", "scipy_openblas"):
            for suffix in ("", "64_"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype = ctypes.c_int
                    put.argtypes = [ctypes.c_int]
                    pools.append((get, put))
    return tuple(pools)


@contextlib.contextmanager
def one_blas_thread():
    """OpenBLAS on one thread inside the block (restored after the last of concurrent users leaves).

    The list search makes thousands of small products; OpenBLAS splitting each over its threads, and its idle
    threads spinning between them, made it twice as slow on two cores. jasmk runs its own threads over blocks of
    rows instead."""
    pools = _openblas_pools()
    with _blas_lock:
        if _blas_state["users"] == 0:
            _blas_state["saved"] = [get() for get, _ in pools]
            for _, put in pools:
                put(1)
        _blas_state["users"] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_state["users"] -= 1
            if _blas_state["users"] == 0:
                for (_, put), n in zip(pools, _blas_state["saved"]):
                    put(n)


def nearest_lists(dist: np.ndarray, n_probe: int, slack: np.ndarray):
    """The ``n_probe`` nearest lists of each row from its ``[n, L] float32`` coarse distances: ``([n, P] int32`` list
    ids, nearest first, ``[n] bool`` near-ties: the next list within ``slack [n]`` of the last one)."""
    probes = np.empty((dist.shape[0], n_probe), np.int32)
    near = _kernels().nearest_lists(np.ascontiguousarray(dist, np.float32), int(n_probe),
                                    np.ascontiguousarray(slack, np.float32), probes)
    return probes, near


def search_lists(x, xnorm, probes, words, wnorm, starts, t: int):
    """The ``t`` nearest of each row's candidate words (the words of its probed lists), float32:
    ``([n, t] float32`` squared distances, ``[n, t] int32`` positions in ``words``), see
    :func:`jasmk.core.numba_kernel.search_lists`."""
    n = x.shape[0]
    top_d = np.empty((n, t), np.float32)
    top_i = np.empty((n, t), np.int32)
    _kernels().search_lists(x, xnorm, probes, words, wnorm, starts, top_d, top_i)
    return top_d, top_i


__all__ = ["CACHE_BYTES", "aggregate_binary", "available", "cache_dir", "cache_stats", "nearest_lists",
           "one_blas_thread", "score_segment", "search_lists"]
