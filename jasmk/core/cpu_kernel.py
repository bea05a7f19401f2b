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

import functools
import logging
import math

import numpy as np

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _kernels():
    """Compile (once per process; numba caches to disk) and return the scoring kernel."""
    import numba
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def popcount32(typingctx, x):
        sig = types.uint32(types.uint32)

        def codegen(context, builder, signature, args):
            return builder.ctpop(args[0])

        return sig, codegen

    two40 = 2.0**40

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def score(vecs, images, offsets, uwords, ustart, q_vecs, q_slots, q_weight, ktable, scale, q_scale, n_images,
              out):
        # out [b, I]; one float64 sum per (image, query) in a [I, b] buffer
        width = vecs.shape[1]
        b = out.shape[0]
        i_cap = out.shape[1]
        acc = np.zeros((i_cap, b), np.int64)
        for u in range(uwords.shape[0]):
            w = uwords[u]
            p0 = offsets[w]
            p1 = offsets[w + 1]
            if p1 == p0:
                continue
            weight = q_weight[ustart[u]]
            for r in range(ustart[u], ustart[u + 1]):  # one query row against the word's postings (in L1)
                q = q_slots[r]
                for p in range(p0, p1):
                    h = 0
                    for j in range(width):
                        h += popcount32(q_vecs[r, j] ^ vecs[p, j])
                    # the XLA kernels' float32 term, in their fixed point (2**-40): integer sums, exact
                    acc[images[p], q] += np.int64(math.floor(np.float64(np.float32(ktable[h] * weight)) * two40))
        for i in range(i_cap):
            for q in range(b):
                if i < n_images:
                    v = acc[i, q]  # rebuilt as jasmk.score.from_limbs does: canonical 16-bit digits, high first
                    t = np.float32(v >> 48) * np.float32(2.0**8)
                    t = t + np.float32((v >> 32) & 0xFFFF) * np.float32(2.0**-8)
                    t = t + np.float32((v >> 16) & 0xFFFF) * np.float32(2.0**-24)
                    t = t + np.float32(v & 0xFFFF) * np.float32(2.0**-40)
                    out[q, i] = (t * scale[i]) * q_scale[q]
                else:
                    out[q, i] = -np.inf

    return score


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
    score = _kernels()
    i_cap = hseg.norm_factor.shape[0]
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
        score(hseg.vecs, hseg.images, hseg.offsets, uwords, ustart, qv, qs, qwt, ktable, hseg.scale, q_scale[s0:s1],
              np.int64(hseg.n_images), out[s0:s1])
    return out

__all__ = ["CACHE_BYTES", "available", "score_segment"]
