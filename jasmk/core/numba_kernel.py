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


@numba.njit(cache=True, nogil=True, boundscheck=False)
def nearest_lists(dist, nprobe, slack, out):
    """``out [n, nprobe]``: the ``nprobe`` smallest of each row of ``dist [n, L] float32`` (coarse distances),
    nearest first; returns ``[n] bool``: the row's next list is within ``slack[row]`` of its last one (a near-tie
    whose set the caller settles exactly)."""
    n, n_lists = dist.shape
    near = np.zeros(n, np.bool_)
    keep = min(nprobe + 1, n_lists)
    best = np.empty(keep, np.float32)
    bid = np.empty(keep, np.int32)
    for i in range(n):
        cnt = 0
        for j in range(n_lists):
            d = dist[i, j]
            if cnt < keep:
                p = cnt
                cnt += 1
            elif d < best[keep - 1]:
                p = keep - 1
            else:
                continue
            while p > 0 and best[p - 1] > d:
                best[p] = best[p - 1]
                bid[p] = bid[p - 1]
                p -= 1
            best[p] = d
            bid[p] = j
        if keep > nprobe and best[nprobe] - best[nprobe - 1] <= slack[i]:
            near[i] = True
        for p in range(nprobe):
            out[i, p] = bid[p]
    return near


@numba.njit(cache=True, nogil=True, boundscheck=False)
def search_lists(x, xnorm, probes, words, wnorm, starts, top_d, top_i):
    """The ``T`` nearest candidates of each row of ``x [n, D] float32`` among the words of its probed lists
    (``probes [n, P] int32``; list ``l`` holds ``words[starts[l]:starts[l + 1]]``, sorted by list): float32 squared
    distances ``|x|^2 + (|c|^2 - 2 x.c)`` into ``top_d [n, T]`` (``inf``: none) and list-order word positions into
    ``top_i [n, T]`` (``-1``: none), nearest first. The rows probing a list are multiplied with its words in one
    BLAS product, so a distance's rounding depends on that block (the caller settles near-ties in float64)."""
    n, dim = x.shape
    n_lists = starts.shape[0] - 1
    n_probe = probes.shape[1]
    t = top_d.shape[1]
    first = np.zeros(n_lists + 1, np.int64)  # the rows probing list l: rows[first[l]:first[l + 1]]
    for i in range(n):
        for p in range(n_probe):
            first[probes[i, p] + 1] += 1
    most = 1
    widest = 1
    for lst in range(n_lists):
        most = max(most, first[lst + 1])
        widest = max(widest, starts[lst + 1] - starts[lst])
        first[lst + 1] += first[lst]
    rows = np.empty(n * n_probe, np.int64)
    fill = first[:-1].copy()
    for i in range(n):
        for p in range(n_probe):
            lst = probes[i, p]
            rows[fill[lst]] = i
            fill[lst] += 1
    top_d[:, :] = np.inf
    top_i[:, :] = -1
    block = np.empty((most, dim), np.float32)
    v = np.empty(widest, np.float32)
    two = np.float32(2.0)
    for lst in range(n_lists):
        r0 = first[lst]
        m = first[lst + 1] - r0
        w0 = starts[lst]
        width = starts[lst + 1] - w0
        if m == 0 or width == 0:
            continue
        for a in range(m):
            block[a, :] = x[rows[r0 + a], :]
        dots = np.dot(block[:m], words[w0:w0 + width].T)
        norms = wnorm[w0:w0 + width]
        for a in range(m):
            i = rows[r0 + a]
            xn = xnorm[i]
            worst = top_d[i, t - 1]
            row = dots[a]
            hits = 0
            for j in range(width):  # one vectorised pass; most (row, list) pairs end here
                vj = norms[j] - two * row[j]
                v[j] = vj
                hits += (xn + vj) < worst
            if hits == 0:
                continue
            for j in range(width):
                d = xn + v[j]
                if d < worst:
                    p = t - 1
                    while p > 0 and top_d[i, p - 1] > d:
                        top_d[i, p] = top_d[i, p - 1]
                        top_i[i, p] = top_i[i, p - 1]
                        p -= 1
                    top_d[i, p] = d
                    top_i[i, p] = w0 + j
                    worst = top_d[i, t - 1]
