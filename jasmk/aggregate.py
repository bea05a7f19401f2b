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


def _group_by_table(cell, valid, n_cells: int):
    """Rows of the occupied cells of a dense table, numbered in cell order: cost ``O(n_cells)``.

    Returns ``(seg [M] int32 row of each pair (M for invalid pairs), row_cells [M] int32 cell of each row
    (``n_cells`` past the last row), n_rows)``."""
    m = cell.shape[0]
    occupied = jnp.zeros((n_cells,), jnp.int32).at[cell].max(1, mode="drop")
    row_of_cell = jnp.cumsum(occupied) - 1
    seg = jnp.where(valid, row_of_cell[jnp.minimum(cell, n_cells - 1)], m)
    row_cells = jnp.nonzero(occupied, size=m, fill_value=n_cells)[0].astype(jnp.int32)
    return seg, row_cells, row_of_cell[-1] + 1


def _group_by_sort(cell, valid, n_cells: int):
    """Same result as :func:`_group_by_table` by sorting the pairs' cells: cost ``O(M log M)``."""
    m = cell.shape[0]
    key = jnp.where(valid, cell, n_cells)
    skey, spair = jax.lax.sort((key, jnp.arange(m, dtype=jnp.int32)), num_keys=2)
    real = skey < n_cells
    new = real & jnp.concatenate([jnp.ones((1,), bool), skey[1:] != skey[:-1]])
    srow = jnp.cumsum(new.astype(jnp.int32)) - 1
    seg = jnp.zeros((m,), jnp.int32).at[spair].set(jnp.where(real, srow, m))
    row_cells = jnp.full((m,), n_cells, jnp.int32).at[jnp.where(new, srow, m)].set(skey, mode="drop")
    return seg, row_cells, jnp.sum(new.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("binary", "n_slots", "extra_cap", "grouping"))
def aggregate_padded(centroids, vecs, word_ids, image_ids, *, binary: bool, n_slots: int,
                     extra_cap: int | None = None, grouping: str = "table"):
    """Jitted aggregation of a padded block of descriptors from at most ``n_slots`` images.

    Each (image slot, word) pair is a cell ``slot * K + word``; the occupied cells, in cell order, are the
    output rows, so rows come out sorted by image then word. ``grouping="table"`` finds them with a dense
    ``[n_slots * K]`` table (cheap when the table is not much larger than the pairs), ``"sort"`` by sorting
    the pairs. Each row gathers its first descriptor; the other members (few: bursts of one word in one
    image) are scatter-added, in descriptor order, from a compacted list of at most ``extra_cap`` pairs.

    Args:
        centroids: ``[K, D] float32``.
        vecs: ``[N, D] float32`` descriptors.
        word_ids: ``[N, MA] int32`` assigned words (a negative id marks no assignment).
        image_ids: ``[N] int32`` image slot ``0..n_slots-1`` of each descriptor; ``PAD_IMAGE`` marks padding rows.
        extra_cap: static bound on the non-first members (default ``N * MA``: always enough).

    Returns:
        ``(agg [N*MA, W], words [N*MA] int32, slots [N*MA] int32, n_rows int32, n_extra int32)``: the first
        ``n_rows`` rows are the aggregated (image slot, word) pairs sorted by slot then word; the rest is
        padding with slot ``PAD_IMAGE``. The result is exact only if ``n_extra <= extra_cap``.
    """
    n, ma = word_ids.shape
    k = centroids.shape[0]
    m = n * ma
    n_cells = n_slots * k
    extra_cap = m if extra_cap is None else min(int(extra_cap), m)
    valid = ((image_ids[:, None] != PAD_IMAGE) & (word_ids >= 0)).reshape(m)
    cell = jnp.where(valid, (image_ids[:, None] * k + word_ids).reshape(m), n_cells)
    group = {"table": _group_by_table, "sort": _group_by_sort}[grouping]
    seg, row_cells, n_rows = group(cell, valid, n_cells)
    pair = jnp.arange(m, dtype=jnp.int32)
    first = jnp.full((m,), m, jnp.int32).at[seg].min(pair, mode="drop")  # first member pair of each row
    is_extra = valid & (first[jnp.minimum(seg, m - 1)] != pair)
    n_extra = jnp.sum(is_extra.astype(jnp.int32))
    extra = jnp.nonzero(is_extra, size=extra_cap, fill_value=m)[0]
    out_words = jnp.where(row_cells < n_cells, row_cells % k, 0)
    out_slots = jnp.where(row_cells < n_cells, row_cells // k, PAD_IMAGE)
    # residuals summed member by member in descriptor order, (x0 - c) + (x1 - c) + ..., as asmk sums them
    flat_words = jnp.clip(word_ids.reshape(m), 0, k - 1)
    safe_extra = jnp.minimum(extra, m - 1)
    agg = vecs[jnp.minimum(first, m - 1) // ma] - centroids[out_words]
    agg = agg.at[jnp.where(extra < m, seg[safe_extra], m)].add(
        vecs[safe_extra // ma] - centroids[flat_words[safe_extra]], mode="drop")
    agg = jnp.where((row_cells < n_cells)[:, None], agg, 0.0)
    out = binarize_and_pack(agg) if binary else normalize_l2(agg)
    return out, out_words, out_slots, n_rows, n_extra


def _bucket(n: int, minimum: int = 256) -> int:
    """Smallest power of two >= n (and >= minimum), so that jitted shapes repeat."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def image_chunks(image_ids: np.ndarray, chunk_descriptors: int, max_images: int):
    """Split grouped ``image_ids`` into ``(start, stop)`` ranges of whole images: about ``chunk_descriptors``
    descriptors and at most ``max_images`` images each (an image larger than a chunk gets its own)."""
    n = image_ids.shape[0]
    if n == 0:
        return []
    boundaries = np.flatnonzero(np.diff(image_ids)) + 1
    starts = np.concatenate([[0], boundaries])
    stops = np.concatenate([boundaries, [n]])
    chunks, cur_start, cur_images = [], 0, 0
    for s, e in zip(starts, stops):
        if s > cur_start and (e - cur_start > chunk_descriptors or cur_images >= max_images):
            chunks.append((cur_start, int(s)))
            cur_start, cur_images = int(s), 0
        cur_images += 1
    chunks.append((cur_start, n))
    return chunks


def aggregate(centroids, vecs: np.ndarray, word_ids: np.ndarray, image_ids: np.ndarray, *, binary: bool,
              chunk_descriptors: int = 32768, grouping: str | None = None) -> Aggregated:
    """Aggregate validated descriptors image by image (in chunks of whole images).

    Args:
        centroids: ``[K, D] float32``.
        vecs: ``[N, D] float32`` descriptors.
        word_ids: ``[N, MA] int32`` assigned words.
        image_ids: ``[N] int`` grouped, ascending image ids.
        binary: ASMK* (packed sign bits) if True, ASMK (unit real vectors) if False.
        chunk_descriptors: descriptors per jitted chunk (whole images).
        grouping: ``"table"`` or ``"sort"`` (see :func:`aggregate_padded`); None picks per chunk.

    Returns:
        :class:`Aggregated` rows sorted by image then word, as host arrays.
    """
    centroids = jnp.asarray(centroids)
    d = vecs.shape[1]
    width = packed_width(d) if binary else d
    out_vecs, out_words, out_images = [], [], []
    k = centroids.shape[0]
    max_images = max(1, min(4096, (2**31 - 1) // k - 1))  # slot * K + word must fit in int32
    for start, stop in image_chunks(image_ids, chunk_descriptors, max_images):
        n = stop - start
        cap = _bucket(n)
        v = np.zeros((cap, d), np.float32)
        v[:n] = vecs[start:stop]
        w = np.zeros((cap, word_ids.shape[1]), np.int32)
        w[:n] = word_ids[start:stop]
        uniq, slot = np.unique(image_ids[start:stop], return_inverse=True)
        im = np.full((cap,), PAD_IMAGE, np.int32)
        im[:n] = slot
        n_slots = _bucket(len(uniq), minimum=1)
        # a dense table when it is at most a few cells per pair, else a sort
        how = grouping or ("table" if n_slots * k <= 8 * cap * w.shape[1] else "sort")
        extra_cap = _bucket(cap * w.shape[1] // 4)
        kwargs = dict(binary=binary, n_slots=n_slots, grouping=how)
        agg, words, slots, n_rows, n_extra = aggregate_padded(centroids, v, w, im, extra_cap=extra_cap, **kwargs)
        if int(n_extra) > extra_cap:  # a bursty chunk: redo with room for every pair
            agg, words, slots, n_rows, n_extra = aggregate_padded(centroids, v, w, im, **kwargs)
        n_rows = int(n_rows)
        out_vecs.append(np.asarray(agg[:n_rows]))
        out_words.append(np.asarray(words[:n_rows]))
        out_images.append(uniq[np.asarray(slots[:n_rows])].astype(np.int32))
    if not out_vecs:
        dtype = np.uint32 if binary else np.float32
        return Aggregated(np.zeros((0, width), dtype), np.zeros((0,), np.int32), np.zeros((0,), np.int32))
    return Aggregated(np.concatenate(out_vecs), np.concatenate(out_words), np.concatenate(out_images))
