"""Compiled CPU kernel (numba) for the sparse ASMK* path: shared posting reads, one pass per batch.

XLA on the CPU spends most of the sparse path's time in gathers and scatters per (query row, posting) pair.
This kernel walks the batch's distinct words in ascending order; for each word it reads each posting of the
word once and compares it with every query row of the batch that holds the word (popcount of XOR, kernel
table, idf weight), adding into one float64 sum per (image, query), which is rounded to float32 once at the
end. The contributions and the normalization are the float32 values of :mod:`jasmk.score`; the sums differ
from the XLA kernels' fixed-point sums only in their last rounding, so the scores agree with theirs to about
1e-7, and a score never depends on the batch it is computed in (nor on the order of its rows).

numba is optional at import time: :func:`available` says whether the kernel can run; the engine falls back to
the XLA sparse kernel without it.
"""

from __future__ import annotations

import functools
import logging

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

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def score(vecs, images, offsets, uwords, ustart, q_vecs, q_slots, q_weight, ktable, scale, q_scale, n_images,
              out):
        # out [b, I]; one float64 sum per (image, query) in a [I, b] buffer
        width = vecs.shape[1]
        b = out.shape[0]
        i_cap = out.shape[1]
        acc = np.zeros((i_cap, b), np.float64)
        weighted = np.empty(ktable.shape[0], np.float64)
        for u in range(uwords.shape[0]):
            w = uwords[u]
            r0 = ustart[u]
            r1 = ustart[u + 1]
            if offsets[w + 1] == offsets[w]:
                continue
            for t in range(ktable.shape[0]):  # kernel x idf of this word, rounded to float32 as the XLA kernels do
                weighted[t] = np.float32(ktable[t] * q_weight[r0])
            for p in range(offsets[w], offsets[w + 1]):
                img = images[p]
                for r in range(r0, r1):
                    h = 0
                    for j in range(width):
                        h += popcount32(q_vecs[r, j] ^ vecs[p, j])
                    acc[img, q_slots[r]] += weighted[h]
        for i in range(i_cap):
            for q in range(b):
                if i < n_images:
                    out[q, i] = (np.float32(acc[i, q]) * scale[i]) * q_scale[q]
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
