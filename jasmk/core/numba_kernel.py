"""The numba scoring kernel of :mod:`jasmk.core.cpu_kernel` (imported only by it, when numba is there).

Defined at module level, so that numba's on-disk cache finds it again in later processes; its cache directory is
set by :mod:`jasmk.core.cpu_kernel` (a user cache folder, never the package's).
"""

import math

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

TWO40 = 2.0**40


@intrinsic
def popcount(typingctx, x):
    """The population count of an unsigned integer of any width (LLVM's ctpop): the kernel reads packed codes as
    uint64 words where their width allows (half the loop of uint32 words)."""
    if not isinstance(x, types.Integer):
        return None
    sig = x(x)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def fixed_table(ktable, weight, out):
    """``out[h] = floor(float32(ktable[h] * weight) * 2**40)``: the fixed-point term of every Hamming distance for
    one word weight (computed once per weight, not once per pair)."""
    for h in range(ktable.shape[0]):
        out[h] = np.int64(math.floor(np.float64(np.float32(ktable[h] * weight)) * TWO40))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def score(vecs, images, offsets, uwords, ustart, q_vecs, q_slots, q_weight, ktable, scale, q_scale, n_images, out):
    """Scores of sorted query rows against a segment's postings into ``out [b, I]`` (see cpu_kernel)."""
    # one int64 fixed-point sum per (image, query) in an [I, b] buffer
    width = vecs.shape[1]
    b = out.shape[0]
    i_cap = out.shape[1]
    acc = np.zeros((i_cap, b), np.int64)
    # the XLA kernels' float32 term of each Hamming distance, in their fixed point (2**-40): integer sums, exact
    fixed = np.empty(ktable.shape[0], np.int64)
    last = np.float32(np.nan)
    for u in range(uwords.shape[0]):
        w = uwords[u]
        p0 = offsets[w]
        p1 = offsets[w + 1]
        if p1 == p0:
            continue
        weight = q_weight[ustart[u]]
        if weight != last:  # without idf every word has weight 1: one table for the whole call
            fixed_table(ktable, weight, fixed)
            last = weight
        for r in range(ustart[u], ustart[u + 1]):  # one query row against the word's postings (in L1)
            q = q_slots[r]
            for p in range(p0, p1):
                h = 0
                for j in range(width):
                    h += np.int64(popcount(q_vecs[r, j] ^ vecs[p, j]))
                acc[images[p], q] += fixed[h]
    for i in range(i_cap):
        for q in range(b):
            if i < n_images:
                v = acc[i, q]  # rebuilt as jasmk.core.score.from_limbs does: canonical 16-bit digits, high first
                t = np.float32(v >> 48) * np.float32(2.0**8)
                t = t + np.float32((v >> 32) & 0xFFFF) * np.float32(2.0**-8)
                t = t + np.float32((v >> 16) & 0xFFFF) * np.float32(2.0**-24)
                t = t + np.float32(v & 0xFFFF) * np.float32(2.0**-40)
                out[q, i] = (t * scale[i]) * q_scale[q]
            else:
                out[q, i] = -np.inf


@numba.njit(cache=True, nogil=True, boundscheck=False)
def aggregate_binary(vecs, centroids, desc, words, starts, sizes, out):
    """ASMK* codes of cells of (descriptor, word) pairs sorted by cell: for cell ``i``, the float32 residuals
    ``vecs[desc[p]] - centroids[words[p]]`` of its pairs ``p = starts[i] .. starts[i] + sizes[i] - 1`` summed in
    that order, then their signs packed most significant bit first into ``out [cells, W] uint32`` (the bits of
    :func:`jasmk.core.aggregate.aggregate_host`)."""
    d = vecs.shape[1]
    buf = np.empty(d, np.float32)
    for i in range(starts.shape[0]):
        p = starts[i]
        x = vecs[desc[p]]
        c = centroids[words[p]]
        for j in range(d):
            buf[j] = x[j] - c[j]
        for r in range(1, sizes[i]):
            x = vecs[desc[p + r]]
            c = centroids[words[p + r]]
            for j in range(d):
                buf[j] += x[j] - c[j]
        for k in range(out.shape[1]):
            v = np.uint32(0)
            for b in range(32):
                j = 32 * k + b
                if j < d and buf[j] > 0:
                    v |= np.uint32(1) << np.uint32(31 - b)
            out[i, k] = v


__all__ = ["TWO40", "aggregate_binary", "fixed_table", "popcount", "score"]
