"""ASMK scoring of query images against an :class:`~jasmk.ivf.Index`.

For a query image with aggregated rows ``(q_w, v_w)``, the score of database image ``j`` is

    sum_w  idf[w] * sigma(sim(v_w, x_{j,w})) / sqrt(norm[j])   /   sqrt(sum_w idf[w])

with ``sim = 1 - 2 * hamming / bits`` (binary, ``bits = 32 * W``) or a dot product (real), and the selective
kernel ``sigma(u) = u**alpha`` for ``u >= threshold`` else 0. The query normalization sums idf over all
query rows, also those whose word has no postings (as asmk does).

How it is computed: a batch of ``B`` query images is scattered into a word table ``T [U + 1, B, W]`` (``U`` the
distinct words of the batch; row ``U`` is all zeros for the words the batch lacks) with their idf weights
``Wt [U + 1, B]``. One pass over the inverted file, in blocks of ``block`` postings, then reads for each posting
``x`` (word ``w``, image ``j``) the ``B`` query vectors of its word, computes ``B`` similarities at once and adds
``Wt[w] * sigma(sim)`` to row ``j`` of the ``[n_images, B]`` score accumulator. Every operation is dense and
vectorized over the batch; the cost is ``n_postings * B`` similarity evaluations per batch, whatever the
overlap of words, and the memory is the table plus the accumulator.

For ASMK* the kernel is read from a ``bits + 1`` entry table (the similarity takes only those values); for
ASMK the common integer exponents ``alpha = 1, 2, 3`` are multiplications and other values use ``pow``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .ivf import Index


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


PARTIAL_SUMS = 8  # most partial sums per score
ACC_BYTES = 256 * 2**20  # the accumulator of partial sums stays within this (down to one sum per score)


def partial_sums(index: Index, n_queries: int) -> int:
    """Partial sums per score: ``PARTIAL_SUMS``, halved while ``groups x n_images x B`` floats exceed 256 MiB."""
    g = PARTIAL_SUMS
    while g > 1 and g * max(index.n_images, 1) * n_queries * 4 > ACC_BYTES:
        g //= 2
    return g


def _db_normalization(index: Index):
    """``[n_images] float32`` ``1 / sqrt(norm_factor)`` (0 for image slots without entries)."""
    norm = index.norm_factor
    return jnp.where(norm > 0, jax.lax.rsqrt(jnp.where(norm > 0, norm, 1.0)), 0.0)


def default_block(index: Index, n_queries: int) -> int:
    """Postings per scan step: keeps the per-step temporaries (``block * B * W`` words) near 4 MiB."""
    per_posting = max(1, n_queries * index.width * 4)
    block = 1 << max(6, min(12, (4 * 2**20 // per_posting).bit_length() - 1))
    return min(block, index.entry_vecs.shape[0])


@functools.partial(jax.jit, static_argnames=("n_queries", "block", "groups"))
def score_rows(index: Index, q_vecs, q_words, q_slots, alpha, threshold, *, n_queries: int, block: int | None = None,
               groups: int | None = None):
    """Dense scores of a batch of ``n_queries`` query images given as flat aggregated rows.

    Args:
        index: the inverted file.
        q_vecs: ``[R, W]`` aggregated query rows (same kind as ``index.entry_vecs``).
        q_words: ``[R] int32`` word of each row.
        q_slots: ``[R] int32`` query image (``0..n_queries-1``) of each row; any other value marks padding.
            A (query, word) pair must appear at most once (as aggregation guarantees).
        alpha, threshold: selective-kernel exponent and threshold (traced scalars).
        n_queries: static batch size ``B``.
        block: static postings per scan step (a power of two dividing the padded posting arrays; default
            :func:`default_block`).
        groups: static number of partial sums per score (postings split by word modulo ``groups``), added at
            the end: float32 error shrinks about ``groups`` times (default :func:`partial_sums`).

    Returns:
        ``[B, n_images] float32`` scores (internal image order); a query slot without rows scores 0.
    """
    b = int(n_queries)
    k, n = index.n_words, index.n_images
    r = q_words.shape[0]
    e_pad, width = index.entry_vecs.shape
    block = default_block(index, b) if block is None else int(block)
    groups = partial_sums(index, b) if groups is None else max(1, int(groups))
    if e_pad % block:
        raise ValueError(f"block {block} does not divide the {e_pad} padded postings")
    alpha = jnp.asarray(alpha, jnp.float32)
    threshold = jnp.asarray(threshold, jnp.float32)
    valid = (q_slots >= 0) & (q_slots < b)
    slots = jnp.where(valid, q_slots, b)
    words = jnp.where(valid, q_words, 0).astype(jnp.int32)
    idf_q = jnp.where(valid, index.idf[words], 0.0)
    # word -> row of the batch table (u_cap: all-zero row for words the batch lacks)
    u_cap = min(k, max(r, 1))
    present = jnp.zeros((k + 1,), jnp.int32).at[jnp.where(valid, words, k)].set(1)[:k]
    lookup = jnp.where(present > 0, jnp.cumsum(present) - 1, u_cap).astype(jnp.int32)
    row = jnp.where(valid, lookup[words], u_cap + 1)
    table = jnp.zeros((u_cap + 1, b, width), q_vecs.dtype).at[row, slots].set(q_vecs, mode="drop")
    weight = jnp.zeros((u_cap + 1, b), jnp.float32).at[row, slots].set(idf_q, mode="drop")
    if index.binary:
        bits = 32 * width
        u = 1.0 - 2.0 * jnp.arange(bits + 1, dtype=jnp.float32) / float(bits)
        kernel_table = selective_kernel(u, alpha=alpha, threshold=threshold)

    def step(acc, blk):
        x, w, img = blk  # [C, W], [C], [C]
        t = lookup[w]
        q = table[t]  # [C, B, W]
        if index.binary:
            h = jax.lax.population_count(q ^ x[:, None, :]).astype(jnp.int32).sum(-1)
            contrib = kernel_table[h]
        else:
            contrib = _real_kernel(jnp.einsum("cbd,cd->cb", q, x), alpha, threshold)
        # partial sums by word (w % groups): fewer float32 adds per sum, and images with the same postings
        # (duplicates) still get bit-equal scores
        dest = jnp.where(img < n, (w % groups) * n + img, groups * n)  # padding postings: out of range, dropped
        return acc.at[dest].add(contrib * weight[t], mode="drop"), None

    blocks = (index.entry_vecs.reshape(e_pad // block, block, width),
              index.entry_words.reshape(e_pad // block, block),
              index.entry_images.reshape(e_pad // block, block))
    acc, _ = jax.lax.scan(step, jnp.zeros((groups * n, b), jnp.float32), blocks)
    acc = acc.reshape(groups, n, b).sum(axis=0)
    qnorm = jax.ops.segment_sum(idf_q, slots, num_segments=b + 1)[:b]
    qscale = jnp.where(qnorm > 0, jax.lax.rsqrt(jnp.where(qnorm > 0, qnorm, 1.0)), 0.0)
    return acc.T * _db_normalization(index)[None, :] * qscale[:, None]


@functools.partial(jax.jit, static_argnames=("block",))
def score_dense(index: Index, q_vecs, q_words, q_valid, alpha, threshold, *, block: int | None = None):
    """Dense scores of a batch of queries given as padded per-query rows.

    Args:
        index: the inverted file.
        q_vecs: ``[B, Q, W]`` aggregated query rows (same kind as ``index.entry_vecs``).
        q_words: ``[B, Q] int32`` word of each query row.
        q_valid: ``[B, Q] bool`` real rows (False for padding).
        alpha, threshold: selective-kernel exponent and threshold (traced scalars).

    Returns:
        ``[B, n_images] float32`` scores (internal image order).
    """
    b, q = q_words.shape
    slots = jnp.where(q_valid, jnp.arange(b, dtype=jnp.int32)[:, None], b).reshape(b * q)
    return score_rows(index, q_vecs.reshape(b * q, -1), q_words.reshape(b * q), slots, alpha, threshold,
                      n_queries=b, block=block)


@jax.jit
def score_image(index: Index, q_vecs, q_words, q_valid, alpha, threshold):
    """Scores of one query image (``q_vecs [Q, W]``, ``q_words [Q]``, ``q_valid [Q]``): ``[n_images] float32``."""
    return score_dense(index, q_vecs[None], q_words[None], q_valid[None], alpha, threshold)[0]


def top_k(scores, index: Index, topk: int | None):
    """Rank ``[B, n_images]`` scores: ``(ranks [B, k] int32, scores [B, k] float32)``, best first.

    Ranks are internal ids minus ``index.imid_offset``; equal scores keep ascending id order.
    """
    k = index.n_images if topk is None else min(int(topk), index.n_images)
    top_scores, ranks = jax.lax.top_k(scores, k)
    return ranks.astype(jnp.int32) - index.imid_offset, top_scores


@functools.partial(jax.jit, static_argnames=("topk", "block"))
def score_batch(index: Index, q_vecs, q_words, q_valid, alpha, threshold, *, topk: int | None,
                block: int | None = None):
    """A batch of queries (:func:`score_dense`), ranked.

    Args:
        q_vecs: ``[B, Q, W]``; q_words: ``[B, Q] int32``; q_valid: ``[B, Q] bool``.
        topk: keep the best ``topk`` images per query (None: rank all ``n_images``).

    Returns:
        ``(ranks [B, k] int32, scores [B, k] float32)`` best first, ranks in internal ids minus
        ``index.imid_offset``; equal scores keep ascending id order.
    """
    return top_k(score_dense(index, q_vecs, q_words, q_valid, alpha, threshold, block=block), index, topk)


@functools.partial(jax.jit, static_argnames=("n_queries", "topk", "block"))
def score_rows_ranked(index: Index, q_vecs, q_words, q_slots, alpha, threshold, *, n_queries: int,
                      topk: int | None, block: int | None = None):
    """:func:`score_rows`, ranked as :func:`score_batch`."""
    scores = score_rows(index, q_vecs, q_words, q_slots, alpha, threshold, n_queries=n_queries, block=block)
    return top_k(scores, index, topk)
