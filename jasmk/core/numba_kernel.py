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
def popcount32(typingctx, x):
    """The population count of a uint32 (LLVM's ctpop)."""
    sig = types.uint32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@numba.njit(cache=True, nogil=True, boundscheck=False)
def score(vecs, images, offsets, uwords, ustart, q_vecs, q_slots, q_weight, ktable, scale, q_scale, n_images, out):
    """Scores of sorted query rows against a segment's postings into ``out [b, I]`` (see cpu_kernel)."""
    # one int64 fixed-point sum per (image, query) in an [I, b] buffer
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
                acc[images[p], q] += np.int64(math.floor(np.float64(np.float32(ktable[h] * weight)) * TWO40))
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


__all__ = ["TWO40", "popcount32", "score"]
