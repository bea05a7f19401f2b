"""Compiled CPU kernel (numba) for the sparse ASMK* path: shared posting reads, one pass per batch.

XLA on the CPU spends most of the sparse path's time in gathers and scatters per (query row, posting) pair.
This kernel walks the batch's distinct words in ascending order; for each word it reads each posting of the
word once and compares it with every query row of the batch that holds the word (popcount of XOR, kernel
table, idf weight), adding into a ``[groups, I, B]`` float32 accumulator. The arithmetic is the one of
:mod:`jasmk.score` in the same order (rows sorted by word, partial sums by ``word % groups``, the same kernel
table and normalization arrays), so its scores are bit-identical to the XLA kernels' on the CPU backend.

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
    """Compile (once per process; numba caches to disk) and return ``(accumulate, finish)``."""
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
    def accumulate(vecs, images, offsets, uwords, ustart, q_vecs, q_slots, q_weight, ktable, groups, acc):
        width = vecs.shape[1]
        weighted = np.empty_like(ktable)  # kernel x idf of the current word, stored: no fused multiply-add
        for u in range(uwords.shape[0]):
            w = uwords[u]
            g = w % groups
            r0 = ustart[u]
            r1 = ustart[u + 1]
            if offsets[w + 1] == offsets[w]:
                continue
            for t in range(ktable.shape[0]):
                weighted[t] = ktable[t] * q_weight[r0]
            for p in range(offsets[w], offsets[w + 1]):
                img = images[p]
                for r in range(r0, r1):
                    h = 0
                    for j in range(width):
                        h += popcount32(q_vecs[r, j] ^ vecs[p, j])
                    acc[g, img, q_slots[r]] += weighted[h]

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def finish(acc, scale, q_scale, n_images, out):
        groups, i_cap, b = acc.shape
        for i in range(i_cap):
            for q in range(b):
                if i < n_images:
                    t = acc[0, i, q]
                    for g in range(1, groups):
                        t += acc[g, i, q]
                    out[q, i] = (t * scale[i]) * q_scale[q]
                else:
                    out[q, i] = -np.inf

    return accumulate, finish


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether numba is importable and the kernel compiles here."""
    try:
        _kernels()
        return True
    except Exception as exc:  # ImportError, or a numba/LLVM that cannot build the kernel
        log.debug("numba CPU kernel unavailable: %s", exc)
        return False


CACHE_BYTES = 1 << 20  # the accumulator of one kernel call stays within this (cache-resident)


def _word_runs(words: np.ndarray):
    """``(distinct words [U] int32, row ranges [U + 1] int64)`` of rows sorted by word."""
    bounds = np.flatnonzero(np.diff(words)) + 1
    ustart = np.concatenate([[0], bounds, [words.shape[0]]]).astype(np.int64)
    return words[ustart[:-1]].astype(np.int32), ustart


def score_segment(hseg, q_vecs, q_words, q_slots, q_weight, ktable, q_scale, *, n_queries: int,
                  groups: int) -> np.ndarray:
    """Scores of a batch against one segment (host arrays of :class:`jasmk.ivf.HostSegment`).

    The batch is cut into sub-batches of query slots whose ``[groups, I, b]`` accumulator fits in
    :data:`CACHE_BYTES` (the accumulator's random writes dominate otherwise); each sub-batch is one pass over
    the postings of its words.

    Args:
        hseg: host views of the segment.
        q_vecs: ``[R, W] uint32`` query rows sorted by word (stable); q_words: ``[R] int32`` their words;
            q_slots: ``[R] int32`` their query slot; q_weight: ``[R] float32`` idf of their word.
        ktable: ``[bits + 1] float32`` kernel table; q_scale: ``[B] float32`` query normalization.
        n_queries: ``B``; groups: partial sums per score.

    Returns:
        ``[B, I] float32`` scores (-inf on the padding image slots), as :func:`jasmk.score.dense_segment`.
    """
    accumulate, finish = _kernels()
    i_cap = hseg.norm_factor.shape[0]
    sub = int(max(1, min(n_queries, CACHE_BYTES // (groups * i_cap * 4))))
    out = np.empty((n_queries, i_cap), np.float32)
    for s0 in range(0, n_queries, sub):
        s1 = min(n_queries, s0 + sub)
        if sub < n_queries:
            m = (q_slots >= s0) & (q_slots < s1)
            qv, qw, qs, qwt = q_vecs[m], q_words[m], q_slots[m] - s0, q_weight[m]
        else:
            qv, qw, qs, qwt = q_vecs, q_words, q_slots, q_weight
        acc = np.zeros((groups, i_cap, s1 - s0), np.float32)
        if qw.shape[0]:
            uwords, ustart = _word_runs(qw)
            accumulate(hseg.vecs, hseg.images, hseg.offsets, uwords, ustart, qv, qs, qwt, ktable, np.int32(groups),
                       acc)
        finish(acc, hseg.scale, q_scale[s0:s1], np.int64(hseg.n_images), out[s0:s1])
    return out
