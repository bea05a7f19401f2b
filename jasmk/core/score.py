"""ASMK scoring of a batch of query images against one :class:`~jasmk.ivf.Segment` (jitted XLA kernels).

For a query image with aggregated rows ``(q_w, v_w)``, the score of database image ``j`` is

    sum_w  idf[w] * sigma(sim(v_w, x_{j,w})) / sqrt(norm[j])   /   sqrt(sum_w idf[w])

with ``sim = 1 - 2 * hamming / bits`` (binary, ``bits = 32 * W``) or a dot product (real), and the selective
kernel ``sigma(u) = u**alpha`` for ``u >= threshold`` else 0. The query normalization sums idf over all
query rows, also those whose word has no postings (as asmk does).

Two kernels compute the same sums for one segment and a batch of ``B`` query images given as flat rows:

* :func:`dense_segment` scans every posting of the segment in blocks (``lax.scan``): a word table
  ``T [U + 1, B, W]`` holds the batch's rows by word, each posting reads the ``B`` rows of its word and adds
  ``B`` kernel values to its image. Cost ``postings x B``, whatever the batch's words: good for small
  codebooks and all-vs-all on small sets.
* :func:`sparse_segment` touches only the postings of the batch's words: each query row ``r`` expands into
  the ``count[word(r)]`` postings of its word (a ``repeat`` to a static ``pairs_cap``), gathers them, and adds
  one kernel value per (row, posting) pair. Cost ``sum_r count[word(r)]``.

Both accumulate in **fixed point**: each float32 contribution is cut at ``2**-40`` into four 16-bit limbs that
are scatter-added as int32 (:func:`to_limbs`), and the sum is rebuilt in float32 at the end
(:func:`from_limbs`). Integer addition is associative, so a score does not depend on the order in which the
scatter applies its updates (GPU scatter-adds run in no fixed order), on the batch it is computed in or on the
kernel: equal inputs give equal bits everywhere, and ties stay exact. Each contribution loses at most
``2**-40``; a score may collect up to :data:`MAX_TERMS` contributions (one per query row). Contributions arrive
in the order of the query's rows; with rows sorted by word, as :mod:`jasmk.engine` passes them, the two kernels
(and the CPU kernel of :mod:`jasmk.cpu_kernel`) give bit-identical scores on the CPU backend.

For ASMK* the kernel is read from a ``bits + 1`` entry table (the similarity takes only those values); for
ASMK the common integer exponents ``alpha = 1, 2, 3`` are multiplications and other values use ``pow``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .ivf import Segment

NEG_INF = float("-inf")


def selective_kernel(sim, *, alpha, threshold):
    """``sim**alpha`` where ``sim >= threshold``, else 0 (any shape, float32)."""
    keep = sim >= threshold
    return jnp.where(keep, jnp.power(jnp.where(keep, sim, 1.0), alpha), 0.0)


def _real_kernel(u, alpha, threshold):
    """:func:`selective_kernel` with multiplications for ``alpha`` in 1, 2, 3 (``alpha`` traced)."""
    branch = jnp.where(alpha == 1.0, 0, jnp.where(alpha == 2.0, 1, jnp.where(alpha == 3.0, 2, 3)))
    powered = jax.lax.switch(branch, [lambda v: v, lambda v: v * v, lambda v: v * v * v,
                                      lambda v: selective_kernel(v, alpha=alpha, threshold=threshold)], u)
    return jnp.where(u >= threshold, powered, 0.0)


@functools.partial(jax.jit, static_argnames=("bits",))
def kernel_table(alpha, threshold, *, bits: int):
    """``[bits + 1] float32``: the selective kernel of ``1 - 2 h / bits`` for every Hamming distance ``h``."""
    u = 1.0 - 2.0 * jnp.arange(bits + 1, dtype=jnp.float32) / float(bits)
    return selective_kernel(u, alpha=jnp.asarray(alpha, jnp.float32), threshold=jnp.asarray(threshold, jnp.float32))


FRAC_BITS = 40  # fixed-point resolution of one contribution: 2**-40
LIMBS = 4  # 16-bit limbs per sum (int32 each): |score| < 2**23, exact for up to MAX_TERMS contributions
MAX_TERMS = 2**15 - 1  # contributions per score (query rows of one image) the int32 limbs hold without overflow
ACC_BYTES = 256 * 2**20  # the accumulator of one batch and segment ([I, B, LIMBS] int32) stays within this


def to_limbs(c):
    """``[..., LIMBS] int32`` fixed-point digits of float32 ``c``: ``floor(c * 2**40) = sum_k limb_k * 2**(16 k)``
    with ``0 <= limb_k < 2**16`` for ``k < 3`` and a signed top limb. Every step is exact in float32 (a float32
    has at most 24 significant bits, so each shifted floor is representable), on any backend."""
    x = jnp.floor(c * jnp.float32(2.0**FRAC_BITS))
    limbs = []
    for k in range(LIMBS):
        y = jnp.floor(x * jnp.float32(2.0 ** (-16 * k)))
        if k < LIMBS - 1:
            y = y - jnp.float32(2.0**16) * jnp.floor(y * jnp.float32(2.0**-16))
        limbs.append(y.astype(jnp.int32))
    return jnp.stack(limbs, axis=-1)


def from_limbs(acc):
    """float32 value of summed limbs ``[..., LIMBS] int32``: carries are propagated in integers first (so every
    limb but the top one is below 2**16 and converts exactly), then the limbs are added high to low."""
    limbs = []
    carry = jnp.zeros(acc.shape[:-1], jnp.int32)
    for k in range(LIMBS - 1):
        v = acc[..., k] + carry
        carry = jnp.right_shift(v, 16)  # arithmetic: floor division by 2**16
        limbs.append(jnp.bitwise_and(v, 0xFFFF))
    limbs.append(acc[..., LIMBS - 1] + carry)
    s = jnp.stack(limbs, axis=-1).astype(jnp.float32)
    total = s[..., LIMBS - 1] * jnp.float32(2.0 ** (16 * (LIMBS - 1) - FRAC_BITS))
    for k in range(LIMBS - 2, -1, -1):
        total = total + s[..., k] * jnp.float32(2.0 ** (16 * k - FRAC_BITS))
    return total


def query_scale(idf, q_words, q_slots, n_queries: int):
    """``[B] float32`` query normalization ``1 / sqrt(sum of idf over each query's rows)``, traceable (rows
    whose slot is not in ``0..B-1`` are padding). :func:`jasmk.core.engine.query_scale_host` is the host twin."""
    valid = (q_slots >= 0) & (q_slots < n_queries)
    w = jnp.where(valid, idf[jnp.where(valid, q_words, 0)], 0.0)
    qnorm = jax.ops.segment_sum(w, jnp.where(valid, q_slots, n_queries), num_segments=n_queries + 1)[:n_queries]
    return jnp.where(qnorm > 0, jax.lax.rsqrt(jnp.where(qnorm > 0, qnorm, 1.0)), 0.0)


def default_block(seg: Segment, n_queries: int) -> int:
    """Postings per scan step: keeps the per-step temporaries (``block * B * W`` words) near 4 MiB."""
    per_posting = max(1, n_queries * int(seg.vecs.shape[1]) * 4)
    block = 1 << max(6, min(12, (4 * 2**20 // per_posting).bit_length() - 1))
    return min(block, int(seg.vecs.shape[0]))


def _finish(acc, seg: Segment, q_scale, n_queries: int):
    """``[B, I]`` normalized scores from the ``[I, B, LIMBS]`` fixed-point sums; padding image slots get -inf."""
    i_cap = seg.norm_factor.shape[0]
    total = from_limbs(acc.reshape(i_cap, n_queries, LIMBS))
    scores = (total.T * seg.scale[None, :]) * q_scale[:, None]
    return jnp.where(jnp.arange(i_cap)[None, :] < seg.n_images, scores, NEG_INF)


@functools.partial(jax.jit, static_argnames=("n_queries", "block"))
def dense_segment(seg: Segment, idf, q_vecs, q_words, q_slots, q_scale, alpha, threshold, *, n_queries: int,
                  block: int | None = None):
    """Scores of a batch of ``n_queries`` query images against every posting of ``seg`` (dense scan).

    Args:
        seg: the segment.
        idf: ``[K] float32`` word weights of the index.
        q_vecs: ``[R, W]`` aggregated query rows (same kind as ``seg.vecs``).
        q_words: ``[R] int32`` word of each row.
        q_slots: ``[R] int32`` query image (``0..B-1``) of each row; any other value marks padding.
            A (query, word) pair must appear at most once (as aggregation guarantees).
        q_scale: ``[B] float32`` query normalization (:func:`query_scale`).
        alpha, threshold: selective-kernel exponent and threshold (traced scalars).
        n_queries: static batch size ``B``.
        block: static postings per scan step (a power of two dividing the segment capacity; default
            :func:`default_block`).

    Returns:
        ``[B, I] float32`` scores of the segment's image slots (``I`` its image capacity; slots past its
        ``n_images`` are -inf); a query slot without rows scores 0.
    """
    b = int(n_queries)
    k = idf.shape[0]
    r = q_words.shape[0]
    cap, width = seg.vecs.shape
    i_cap = seg.norm_factor.shape[0]
    binary = seg.vecs.dtype == jnp.uint32
    block = default_block(seg, b) if block is None else int(block)
    if cap % block:
        raise ValueError(f"block {block} does not divide the {cap} postings of the segment")
    alpha = jnp.asarray(alpha, jnp.float32)
    threshold = jnp.asarray(threshold, jnp.float32)
    valid = (q_slots >= 0) & (q_slots < b)
    slots = jnp.where(valid, q_slots, b)
    words = jnp.where(valid, q_words, 0).astype(jnp.int32)
    idf_q = jnp.where(valid, idf[words], 0.0)
    # word -> row of the batch table (u_cap: all-zero row for words the batch lacks)
    u_cap = min(k, max(r, 1))
    present = jnp.zeros((k + 1,), jnp.int32).at[jnp.where(valid, words, k)].set(1)[:k]
    lookup = jnp.where(present > 0, jnp.cumsum(present) - 1, u_cap).astype(jnp.int32)
    row = jnp.where(valid, lookup[words], u_cap + 1)
    table = jnp.zeros((u_cap + 1, b, width), q_vecs.dtype).at[row, slots].set(q_vecs, mode="drop")
    weight = jnp.zeros((u_cap + 1, b), jnp.float32).at[row, slots].set(idf_q, mode="drop")
    if binary:
        ktable = kernel_table(alpha, threshold, bits=32 * width)

    def step(acc, blk):
        x, w, img = blk  # [C, W], [C], [C]
        t = lookup[w]
        q = table[t]  # [C, B, W]
        if binary:
            h = jax.lax.population_count(q ^ x[:, None, :]).astype(jnp.int32).sum(-1)
            contrib = ktable[h]
        else:
            # a multiply and a sum over D (not a dot): the same float32 operations in the same order for any
            # batch size and in the sparse kernel, and never TF32 on a GPU
            contrib = _real_kernel(jnp.sum(q * x[:, None, :], axis=-1), alpha, threshold)
        dest = jnp.where(img < i_cap, img, i_cap)  # padding postings: out of range, dropped
        return acc.at[dest].add(to_limbs(contrib * weight[t]), mode="drop"), None

    blocks = (seg.vecs.reshape(cap // block, block, width), seg.words.reshape(cap // block, block),
              seg.images.reshape(cap // block, block))
    acc, _ = jax.lax.scan(step, jnp.zeros((i_cap, b, LIMBS), jnp.int32), blocks)
    return _finish(acc, seg, q_scale, b)


def _sparse_acc(seg: Segment, idf, q_vecs, q_words, q_slots, alpha, threshold, *, n_queries: int,
                pairs_cap: int):
    """Fixed-point sums ``[I * B, LIMBS]`` over the (row, posting) pairs of the batch, and the pair count."""
    b = int(n_queries)
    r, width = q_vecs.shape
    i_cap = seg.norm_factor.shape[0]
    binary = seg.vecs.dtype == jnp.uint32
    valid = (q_slots >= 0) & (q_slots < b)
    words = jnp.where(valid, q_words, 0).astype(jnp.int32)
    start = seg.offsets[words]
    count = jnp.where(valid, seg.offsets[words + 1] - start, 0)
    ends = jnp.cumsum(count)
    total = ends[-1] if r else jnp.int32(0)
    row = jnp.repeat(jnp.arange(r, dtype=jnp.int32), count, total_repeat_length=pairs_cap)
    p = jnp.arange(pairs_cap, dtype=jnp.int32)
    ok = p < total
    pos = jnp.where(ok, start[row] + p - (ends[row] - count[row]), 0)
    x = seg.vecs[pos]
    img = seg.images[pos]
    q = q_vecs[row]
    if binary:
        h = jax.lax.population_count(q ^ x).astype(jnp.int32).sum(-1)
        contrib = kernel_table(alpha, threshold, bits=32 * width)[h]
    else:
        dots = jnp.sum(q * x, axis=-1)
        contrib = _real_kernel(dots, jnp.asarray(alpha, jnp.float32), jnp.asarray(threshold, jnp.float32))
    w_row = words[row]
    dest = jnp.where(ok, img * b + q_slots[row], i_cap * b)
    acc = jnp.zeros((i_cap * b, LIMBS), jnp.int32).at[dest].add(to_limbs(contrib * idf[w_row]), mode="drop")
    return acc, total


@functools.partial(jax.jit, static_argnames=("n_queries", "pairs_cap"))
def sparse_segment(seg: Segment, idf, q_vecs, q_words, q_slots, q_scale, alpha, threshold, *, n_queries: int,
                   pairs_cap: int):
    """Scores of a batch against ``seg``, touching only the postings of the batch's words.

    Arguments as :func:`dense_segment`, plus ``pairs_cap``: static bound on the (row, posting) pairs, ``sum_r
    count[word(r)]`` (the caller computes it on the host and rounds it up on :func:`jasmk.ivf.capacity`'s
    ladder). Pairs past ``pairs_cap`` are dropped: the caller must not pass fewer (:func:`sparse_or_dense`
    is the form with an overflow rule).

    Returns:
        ``[B, I] float32`` scores, as :func:`dense_segment`.
    """
    b = int(n_queries)
    acc, _ = _sparse_acc(seg, idf, q_vecs, q_words, q_slots, alpha, threshold, n_queries=b, pairs_cap=pairs_cap)
    return _finish(acc, seg, q_scale, b)


@functools.partial(jax.jit, static_argnames=("n_queries", "pairs_cap"))
def sparse_or_dense(seg: Segment, idf, q_vecs, q_words, q_slots, q_scale, alpha, threshold, *, n_queries: int,
                    pairs_cap: int):
    """Traceable scores of a batch against ``seg`` for code inside ``jit`` / ``vmap`` (where the touched-pair
    count is data): the sparse kernel when the batch touches at most ``pairs_cap`` (row, posting) pairs, else
    the dense scan (``lax.cond``: both are compiled, one runs). The result is the same either way."""
    b = int(n_queries)
    valid = (q_slots >= 0) & (q_slots < b)
    words = jnp.where(valid, q_words, 0)
    touched = jnp.sum(jnp.where(valid, seg.offsets[words + 1] - seg.offsets[words], 0))
    args = (seg, idf, q_vecs, q_words, q_slots, q_scale, alpha, threshold)
    return jax.lax.cond(
        touched <= pairs_cap,
        lambda a: sparse_segment(*a, n_queries=b, pairs_cap=pairs_cap),
        lambda a: dense_segment(*a, n_queries=b),
        args,
    )


@functools.partial(jax.jit, static_argnames=("k",))
def segment_top_k(scores, seg: Segment, *, k: int):
    """Best ``k`` image slots of a segment's ``[B, I]`` scores: ``(internal ids [B, k] int32, scores [B, k])``;
    equal scores keep ascending ids (padding slots, -inf, come last)."""
    top, idx = jax.lax.top_k(scores, k)
    return idx.astype(jnp.int32) + seg.image_start, top

__all__ = ["ACC_BYTES", "FRAC_BITS", "LIMBS", "MAX_TERMS", "NEG_INF", "default_block", "dense_segment",
    "from_limbs", "kernel_table", "query_scale", "segment_top_k", "selective_kernel", "sparse_or_dense",
    "sparse_segment", "to_limbs"]
