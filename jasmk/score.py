"""ASMK scoring of query images against an :class:`~jasmk.ivf.Index`.

For a query image with aggregated rows ``(q_w, v_w)``, the score of database image ``j`` is

    sum_w  idf[w] * sigma(sim(v_w, x_{j,w})) / sqrt(norm[j])   /   sqrt(sum_w idf[w])

with ``sim = 1 - 2 * hamming / bits`` (binary, ``bits = 32 * W``) or a dot product (real), and the selective
kernel ``sigma(u) = u**alpha`` for ``u >= threshold`` else 0. The query normalization sums idf over all
query rows, also those whose word has no postings (as asmk does).

Every (query row, posting) pair is enumerated into a flat array of static length ``pair_cap`` (no
per-word padding is wasted on short posting lists); the pairs are then reduced into the image scores
with one scatter-add.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .ivf import Index


def similarity(q, db, *, binary: bool):
    """Per-row similarity of ``q`` and ``db`` (both ``[P, W]``): ``[P] float32``."""
    if binary:
        diff = jax.lax.population_count(jnp.bitwise_xor(q, db)).astype(jnp.int32).sum(-1)
        return 1.0 - 2.0 * diff.astype(jnp.float32) / float(32 * q.shape[-1])
    return jnp.sum(q * db, axis=-1)


def selective_kernel(sim, *, alpha, threshold):
    """``sim**alpha`` where ``sim >= threshold``, else 0: ``[P] float32``."""
    keep = sim >= threshold
    return jnp.where(keep, jnp.power(jnp.where(keep, sim, 1.0), alpha), 0.0)


def default_pair_cap(index: Index, n_rows: int) -> int:
    """An upper bound on the (query row, posting) pairs of a query with ``n_rows`` rows."""
    return max(1, int(n_rows) * max(int(index.max_count), 1))


def _pair_contributions(index: Index, q_vecs, q_words, q_valid, alpha, threshold, pair_cap: int):
    """Enumerate one query's (row, posting) pairs.

    Pair ``p`` of query row ``q`` reads posting ``p + delta[q]`` with ``delta[q] = word_offsets[w_q] - start[q]``
    (``start`` the row's first pair). The row's vector, ``delta`` and idf are packed into one ``uint32`` row so
    that each pair does a single query-side gather. The database normalization is left out (it factors out
    of each image's sum, see :func:`score_image`).

    Returns:
        ``(images [pair_cap] int32, contrib [pair_cap] float32, query_norm [] float32, rows [pair_cap] int32)``
        with ``rows`` the query row of each pair; pairs past the real ones contribute 0.
    """
    q_words = jnp.where(q_valid, q_words, 0).astype(jnp.int32)
    idf_q = jnp.where(q_valid, index.idf[q_words], 0.0)
    cnt = jnp.where(q_valid, index.counts[q_words], 0)
    start = jnp.cumsum(cnt) - cnt
    total = jnp.sum(cnt)
    delta = index.word_offsets[q_words] - start
    w = q_vecs.shape[-1]
    packed = jnp.concatenate([jax.lax.bitcast_convert_type(q_vecs, jnp.uint32),
                              jax.lax.bitcast_convert_type(delta, jnp.uint32)[:, None],
                              jax.lax.bitcast_convert_type(idf_q, jnp.uint32)[:, None]], axis=1)
    marks = jnp.zeros((pair_cap,), jnp.int32).at[start].add(1, mode="drop")
    p = jnp.arange(pair_cap, dtype=jnp.int32)
    qi = jnp.clip(jnp.cumsum(marks) - 1, 0, q_words.shape[0] - 1)
    row = packed[qi]  # [P, W + 2]
    valid = p < total
    entry = jnp.where(valid, p + jax.lax.bitcast_convert_type(row[:, w], jnp.int32), 0)
    q = jax.lax.bitcast_convert_type(row[:, :w], q_vecs.dtype)
    sim = similarity(q, index.entry_vecs[entry], binary=index.binary)
    contrib = selective_kernel(sim, alpha=alpha, threshold=threshold)
    idf = jax.lax.bitcast_convert_type(row[:, w + 1], jnp.float32)
    return index.entry_images[entry], jnp.where(valid, contrib * idf, 0.0), jnp.sum(idf_q), qi


def _db_normalization(index: Index):
    """``[n_images] float32`` ``1 / sqrt(norm_factor)`` (0 for image slots without entries)."""
    norm = index.norm_factor
    return jnp.where(norm > 0, jax.lax.rsqrt(jnp.where(norm > 0, norm, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnames=("pair_cap",))
def score_dense(index: Index, q_vecs, q_words, q_valid, alpha, threshold, *, pair_cap: int):
    """Dense scores of a batch of queries against every image slot of the index.

    Args:
        index: the inverted file.
        q_vecs: ``[B, Q, W]`` aggregated query rows (same kind as ``index.entry_vecs``).
        q_words: ``[B, Q] int32`` word of each query row.
        q_valid: ``[B, Q] bool`` real rows (False for padding).
        alpha, threshold: selective-kernel exponent and threshold (traced scalars).
        pair_cap: static number of (query row, posting) pairs enumerated per query; pairs beyond it are
            dropped, so it must be at least ``sum(index.counts[q_words[q_valid]])`` (see :func:`default_pair_cap`).

    Returns:
        ``[B, n_images] float32`` scores (internal image order).
    """
    images, contrib, qnorm, rows = jax.vmap(
        lambda v, w, m: _pair_contributions(index, v, w, m, alpha, threshold, pair_cap)
    )(q_vecs, q_words, q_valid)
    b, n = q_vecs.shape[0], index.n_images
    # float32 sums over thousands of query rows: accumulate each image in up to 16 partial sums (by query
    # row, so that equal images still get bit-equal scores), then add those
    q = q_vecs.shape[1]
    groups = max(1, min(16, (1 << 22) // max(b * n, 1), q))
    n_rows = jnp.maximum(jnp.sum(q_valid, axis=1), 1)
    part = jnp.minimum(rows * groups // n_rows[:, None], groups - 1)
    flat = ((jnp.arange(b, dtype=jnp.int32)[:, None] * groups + part) * n + images).reshape(-1)
    scores = jnp.zeros((b * groups * n,), jnp.float32).at[flat].add(contrib.reshape(-1))
    scores = scores.reshape(b, groups, n).sum(axis=1)
    return scores * _db_normalization(index)[None, :] / jnp.sqrt(qnorm)[:, None]


@functools.partial(jax.jit, static_argnames=("pair_cap",))
def score_image(index: Index, q_vecs, q_words, q_valid, alpha, threshold, *, pair_cap: int):
    """Scores of one query image (``q_vecs [Q, W]``, ``q_words [Q]``, ``q_valid [Q]``): ``[n_images] float32``.

    See :func:`score_dense`.
    """
    return score_dense(index, q_vecs[None], q_words[None], q_valid[None], alpha, threshold, pair_cap=pair_cap)[0]


@functools.partial(jax.jit, static_argnames=("pair_cap", "topk"))
def score_batch(index: Index, q_vecs, q_words, q_valid, alpha, threshold, *, pair_cap: int, topk: int | None):
    """A batch of queries (:func:`score_dense`), ranked.

    Args:
        q_vecs: ``[B, Q, W]``; q_words: ``[B, Q] int32``; q_valid: ``[B, Q] bool``.
        topk: keep the best ``topk`` images per query (None: rank all ``n_images``).

    Returns:
        ``(ranks [B, k] int32, scores [B, k] float32)`` best first, ranks in internal ids minus
        ``index.imid_offset``; equal scores keep ascending id order.
    """
    scores = score_dense(index, q_vecs, q_words, q_valid, alpha, threshold, pair_cap=pair_cap)
    k = index.n_images if topk is None else min(int(topk), index.n_images)
    top_scores, ranks = jax.lax.top_k(scores, k)
    return ranks.astype(jnp.int32) - index.imid_offset, top_scores
