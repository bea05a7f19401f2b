"""Aggregation of local descriptors into one residual vector per (image, visual word).

For each image and each visual word the image's descriptors are assigned to (over all multiple
assignments), the aggregated vector is the sum of residuals ``x - centroid[word]``. ASMK* keeps the
sign bits packed into ``uint32`` words (most significant bit first, last word zero-padded); ASMK keeps
the L2-normalized real vector (``v / (||v|| + 1e-6)``).
"""

from __future__ import annotations

import functools
import logging
import typing

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

PAD_IMAGE = np.iinfo(np.int32).max  # image id of padding rows; sorts after every real id


class Aggregated(typing.NamedTuple):
    """Aggregated residuals of a set of images, sorted by (image, word).

    Attributes:
        vecs: ``[M, W] uint32`` packed sign bits (binary) or ``[M, D] float32`` unit vectors.
        words: ``[M] int32`` visual word of each row.
        images: ``[M] int32`` image id of each row.
    """

    vecs: np.ndarray
    words: np.ndarray
    images: np.ndarray


def packed_width(dim: int) -> int:
    """Number of ``uint32`` words holding ``dim`` sign bits."""
    return -(-int(dim) // 32)


def binarize_and_pack(x):
    """Pack the bits ``x > 0`` into ``uint32`` words, most significant bit first.

    Args:
        x: ``[..., D] float32``.

    Returns:
        ``[..., ceil(D / 32)] uint32``; the unused low bits of the last word are zero.
    """
    d = x.shape[-1]
    w = packed_width(d)
    bits = (x > 0).astype(jnp.uint32)
    bits = jnp.pad(bits, [(0, 0)] * (x.ndim - 1) + [(0, 32 * w - d)])
    bits = bits.reshape(x.shape[:-1] + (w, 32))
    shifts = jnp.arange(31, -1, -1, dtype=jnp.uint32)
    return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)


def normalize_l2(x):
    """``x / (||x||_2 + 1e-6)`` along the last axis, as asmk normalizes aggregated residuals.

    Args:
        x: ``[..., D] float32``.
    """
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


@functools.partial(jax.jit, static_argnames=("binary",))
def aggregate_padded(centroids, vecs, word_ids, image_ids, *, binary: bool):
    """Jitted aggregation of a padded block of descriptors.

    Args:
        centroids: ``[K, D] float32``.
        vecs: ``[N, D] float32`` descriptors.
        word_ids: ``[N, MA] int32`` assigned words (a negative id marks no assignment).
        image_ids: ``[N] int32`` image of each descriptor; ``PAD_IMAGE`` marks padding rows.

    Returns:
        ``(agg [N*MA, W], words [N*MA] int32, images [N*MA] int32, n_rows int32)``: the first ``n_rows``
        rows are the aggregated (image, word) pairs sorted by image then word; the rest is padding
        with image ``PAD_IMAGE``.
    """
    n, ma = word_ids.shape
    m = n * ma
    words = word_ids.reshape(m).astype(jnp.int32)
    images = jnp.repeat(image_ids.astype(jnp.int32), ma)
    images = jnp.where(words < 0, PAD_IMAGE, images)
    src = jnp.repeat(jnp.arange(n, dtype=jnp.int32), ma)
    images, words, src = jax.lax.sort((images, words, src), num_keys=2)
    valid = images != PAD_IMAGE
    first = jnp.concatenate([jnp.ones((1,), bool), (images[1:] != images[:-1]) | (words[1:] != words[:-1])])
    first = first & valid
    seg = jnp.cumsum(first.astype(jnp.int32)) - 1
    n_rows = jnp.sum(first.astype(jnp.int32))
    seg = jnp.where(valid, seg, m)  # padding goes to a dropped segment
    safe_words = jnp.clip(words, 0, centroids.shape[0] - 1)
    resid = vecs[src] - centroids[safe_words]
    agg = jax.ops.segment_sum(resid, seg, num_segments=m)
    out_words = jnp.zeros((m,), jnp.int32).at[seg].set(words, mode="drop")
    out_images = jnp.full((m,), PAD_IMAGE, jnp.int32).at[seg].set(images, mode="drop")
    out = binarize_and_pack(agg) if binary else normalize_l2(agg)
    return out, out_words, out_images, n_rows


def _bucket(n: int, minimum: int = 256) -> int:
    """Smallest power of two >= n (and >= minimum), so that jitted shapes repeat."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def image_chunks(image_ids: np.ndarray, chunk_descriptors: int):
    """Split grouped ``image_ids`` into ``(start, stop)`` ranges of whole images of about ``chunk_descriptors``."""
    n = image_ids.shape[0]
    if n == 0:
        return []
    boundaries = np.flatnonzero(np.diff(image_ids)) + 1
    starts = np.concatenate([[0], boundaries])
    stops = np.concatenate([boundaries, [n]])
    chunks, cur_start = [], 0
    for s, e in zip(starts, stops):
        if e - cur_start > chunk_descriptors and s > cur_start:
            chunks.append((cur_start, int(s)))
            cur_start = int(s)
    chunks.append((cur_start, n))
    return chunks


def aggregate(centroids, vecs: np.ndarray, word_ids: np.ndarray, image_ids: np.ndarray, *, binary: bool,
              chunk_descriptors: int = 32768) -> Aggregated:
    """Aggregate validated descriptors image by image (in chunks of whole images).

    Args:
        centroids: ``[K, D] float32``.
        vecs: ``[N, D] float32`` descriptors.
        word_ids: ``[N, MA] int32`` assigned words.
        image_ids: ``[N] int`` grouped, ascending image ids.
        binary: ASMK* (packed sign bits) if True, ASMK (unit real vectors) if False.

    Returns:
        :class:`Aggregated` rows sorted by image then word, as host arrays.
    """
    centroids = jnp.asarray(centroids)
    d = vecs.shape[1]
    width = packed_width(d) if binary else d
    out_vecs, out_words, out_images = [], [], []
    for start, stop in image_chunks(image_ids, chunk_descriptors):
        n = stop - start
        cap = _bucket(n)
        v = np.zeros((cap, d), np.float32)
        v[:n] = vecs[start:stop]
        w = np.zeros((cap, word_ids.shape[1]), np.int32)
        w[:n] = word_ids[start:stop]
        im = np.full((cap,), PAD_IMAGE, np.int32)
        im[:n] = image_ids[start:stop]
        agg, words, images, n_rows = aggregate_padded(centroids, v, w, im, binary=binary)
        n_rows = int(n_rows)
        out_vecs.append(np.asarray(agg[:n_rows]))
        out_words.append(np.asarray(words[:n_rows]))
        out_images.append(np.asarray(images[:n_rows]))
    if not out_vecs:
        dtype = np.uint32 if binary else np.float32
        return Aggregated(np.zeros((0, width), dtype), np.zeros((0,), np.int32), np.zeros((0,), np.int32))
    return Aggregated(np.concatenate(out_vecs), np.concatenate(out_words), np.concatenate(out_images))
