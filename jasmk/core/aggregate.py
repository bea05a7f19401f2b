"""Aggregation of local descriptors into one residual vector per (image, visual word).

For each image and each visual word the image's descriptors are assigned to (over all multiple
assignments), the aggregated vector is the sum of residuals ``x - centroid[word]``, added member by member
in descriptor order (as asmk sums them, so ASMK* bits are identical). ASMK* keeps the sign bits packed into
``uint32`` words (most significant bit first, last word zero-padded); ASMK keeps the L2-normalized real
vector (``v / (||v|| + 1e-6)``).

The jitted core, :func:`aggregate_padded`, works on one padded block of descriptors: every (descriptor,
assignment) pair is a candidate row; the first pair of each (image, word) cell becomes the row, found with a
scatter-min into a dense ``[n_slots * K]`` table; the few later members of a cell (bursts) are summed into
their row from a compacted list. Rows are emitted in pair order, so nothing is sorted on the way.
"""

from __future__ import annotations

import functools
import logging
import typing

import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernel

log = logging.getLogger(__name__)

PAD_IMAGE = np.iinfo(np.int32).max  # image id / slot of padding rows; sorts after every real id


class Aggregated(typing.NamedTuple):
    """Aggregated residuals of a set of images.

    Attributes:
        vecs: ``[M, W] uint32`` packed sign bits (binary) or ``[M, D] float32`` unit vectors.
        words: ``[M] int32`` visual word of each row.
        images: ``[M] int32`` image id of each row (int64 for ids beyond int32; rows of one image are contiguous,
            images ascending; within an image the rows are sorted by word unless made with ``sort=False``).
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
    bits = jnp.moveaxis(bits.reshape(x.shape[:-1] + (w, 32)), -1, 0)  # [32, ..., W]: sum over a major axis
    shifts = jnp.arange(31, -1, -1, dtype=jnp.uint32).reshape((32,) + (1,) * (x.ndim))
    return jnp.sum(bits << shifts, axis=0, dtype=jnp.uint32)


def normalize_l2(x):
    """``x / (||x||_2 + 1e-6)`` along the last axis, as asmk normalizes aggregated residuals.

    Args:
        x: ``[..., D] float32``.
    """
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


@functools.partial(jax.jit, static_argnames=("binary", "n_slots", "extra_cap"))
def aggregate_padded(centroids, vecs, word_ids, image_ids, *, binary: bool, n_slots: int,
                     extra_cap: int | None = None):
    """Jitted aggregation of a padded block of descriptors from at most ``n_slots`` images.

    Each (descriptor ``n``, assignment ``j``) pair ``p = n * MA + j`` falls in the cell ``(slot[n], word[n, j])``.
    The first pair of a cell is its row: its output holds the cell's aggregated vector; every other pair's output
    is unused and its slot is ``PAD_IMAGE``.

    Args:
        centroids: ``[K, D] float32``.
        vecs: ``[N, D] float32`` descriptors.
        word_ids: ``[N, MA] int32`` assigned words (a negative id marks no assignment).
        image_ids: ``[N] int32`` image slot ``0..n_slots-1`` of each descriptor; ``PAD_IMAGE`` marks padding rows.
        binary: pack sign bits (ASMK*) or L2-normalize (ASMK).
        n_slots: static number of image slots (``n_slots * K`` must fit in int32).
        extra_cap: static bound on the pairs that are not first in their cell (default ``N * MA``: always enough).

    Returns:
        ``(agg [N*MA, W], words [N*MA] int32, slots [N*MA] int32, n_extra int32)``: pair ``p`` is a row iff
        ``slots[p] != PAD_IMAGE``. The result is exact only if ``n_extra <= extra_cap``.
    """
    n, ma = word_ids.shape
    k = centroids.shape[0]
    m = n * ma
    n_cells = n_slots * k
    extra_cap = m if extra_cap is None else max(1, min(int(extra_cap), m))
    words = word_ids.reshape(m)
    valid = ((image_ids[:, None] != PAD_IMAGE) & (word_ids >= 0)).reshape(m)
    safe_words = jnp.clip(words, 0, k - 1)
    pair_slots = jnp.repeat(image_ids, ma)
    cell = jnp.where(valid, pair_slots * k + safe_words, n_cells)
    pair = jnp.arange(m, dtype=jnp.int32)
    first = jnp.full((n_cells,), m, jnp.int32).at[cell].min(pair, mode="drop")[jnp.minimum(cell, n_cells - 1)]
    is_row = valid & (first == pair)
    is_extra = valid & (first != pair)
    n_extra = jnp.sum(is_extra.astype(jnp.int32))

    def residual(p):  # x - centroid of pairs p (any shape), clamped to valid indices
        p = jnp.minimum(p, m - 1)
        return vecs[p // ma] - centroids[safe_words[p]]

    finish = binarize_and_pack if binary else normalize_l2
    out = finish(jnp.repeat(vecs, ma, axis=0) - centroids[safe_words])  # single-member cells: the residual itself
    # cells with several members: sum them in pair (= descriptor) order into a compact buffer, then overwrite
    extra = jnp.nonzero(is_extra, size=extra_cap, fill_value=m)[0].astype(jnp.int32)
    owner = jnp.where(extra < m, first[jnp.minimum(extra, m - 1)], m)  # first pair of each extra's cell
    multi = jnp.zeros((m + 1,), jnp.int32).at[owner].set(1)[:m]
    group = jnp.cumsum(multi) - 1  # compact index of each multi-member cell, at its first pair
    firsts = jnp.nonzero(multi, size=extra_cap, fill_value=m)[0].astype(jnp.int32)
    acc = residual(firsts)
    acc = acc.at[jnp.where(extra < m, group[jnp.minimum(owner, m - 1)], extra_cap)].add(residual(extra), mode="drop")
    out = out.at[firsts].set(finish(acc), mode="drop")
    slots = jnp.where(is_row, pair_slots, PAD_IMAGE)
    return out, jnp.where(is_row, words, 0), slots, n_extra


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


def _sort_rows(agg: Aggregated) -> Aggregated:
    """Rows sorted by (image, word)."""
    order = np.lexsort((agg.words, agg.images))
    return Aggregated(agg.vecs[order], agg.words[order], agg.images[order])


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized host array whose data is 64-byte aligned (``jax.device_put`` then shares it on the CPU)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + nbytes].view(dtype).reshape(shape)


@functools.partial(jax.jit, static_argnames=("binary", "cap", "n_slots", "extra_cap"))
def aggregate_chunks(centroids, vecs, word_ids, image_ids, starts, stops, *, binary: bool, cap: int, n_slots: int,
                     extra_cap: int):
    """:func:`aggregate_padded` over chunks of whole images cut out of the full arrays (``lax.map``).

    Args:
        centroids: ``[K, D] float32``.
        vecs: ``[N, D] float32``; word_ids: ``[N, MA] int32``; image_ids: ``[N] int32`` (grouped ascending).
        starts, stops: ``[C] int32`` descriptor range of each chunk (``stop - start <= cap``, ``N >= cap``; a chunk
            with ``start == stop`` is empty).
        cap: static rows per chunk; n_slots: static bound on the images of a chunk.

    Returns:
        ``(agg [C, cap*MA, W], words [C, cap*MA] int32, images [C, cap*MA] int32, n_extra [C] int32)``: a pair is a
        row iff its image is not ``PAD_IMAGE``.
    """
    n = vecs.shape[0]
    ma = word_ids.shape[1]
    i = jnp.arange(cap, dtype=jnp.int32)

    def one(bounds):
        start, stop = bounds
        base = jnp.minimum(start, n - cap)  # dynamic_slice would clamp: shift the window, mask by position
        x = jax.lax.dynamic_slice_in_dim(vecs, base, cap)
        w = jax.lax.dynamic_slice_in_dim(word_ids, base, cap)
        ids = jax.lax.dynamic_slice_in_dim(image_ids, base, cap)
        inside = (i >= start - base) & (i < stop - base)
        new = inside & ((i == start - base) | (ids != jnp.roll(ids, 1)))
        slot = jnp.where(inside, jnp.cumsum(new.astype(jnp.int32)) - 1, PAD_IMAGE)
        agg, words, slots, n_extra = aggregate_padded(centroids, x, w, slot, binary=binary, n_slots=n_slots,
                                                      extra_cap=extra_cap)
        images = jnp.where(slots != PAD_IMAGE, jnp.repeat(ids, ma), PAD_IMAGE)
        return agg, words, images, n_extra

    return jax.lax.map(one, (starts, stops))


# Descriptors copied into one staging buffer per aggregate_chunks call.
_CALL_ROWS = 1 << 17
#: ASMK* inputs of at most this many (descriptor, word) pairs are aggregated on the host: for a query image or a
#: small batch the jitted path's dispatch, copies and compilations cost more than the arithmetic; same bits.
#: Up to HOST_PAIRS with numpy alone, up to COMPILED_HOST_PAIRS with the compiled CPU kernel (numba). On the CPU
#: backend the compiled kernel takes ASMK* inputs of every size, HOST_CHUNK_PAIRS pairs (whole images) at a time.
HOST_PAIRS = 4096
COMPILED_HOST_PAIRS = 1 << 16
HOST_CHUNK_PAIRS = 1 << 18


def host_serves(n_pairs: int, *, binary: bool, centroids) -> bool:
    """Whether :func:`aggregate` sums ``n_pairs`` (descriptor, word) pairs on the host: ASMK* with host
    centroids, up to :data:`HOST_PAIRS` always, up to :data:`COMPILED_HOST_PAIRS` with the compiled kernel, and at
    every size with the compiled kernel when JAX computes on the CPU (the kernel is faster there, and compiles
    once per machine rather than once per shape)."""
    if not binary or not isinstance(centroids, np.ndarray):
        return False
    if n_pairs <= HOST_PAIRS:
        return True
    if not cpu_kernel.available():
        return False
    return n_pairs <= COMPILED_HOST_PAIRS or jax.default_backend() == "cpu"


def aggregate_host_chunked(centroids: np.ndarray, vecs: np.ndarray, word_ids: np.ndarray, image_ids: np.ndarray, *,
                           chunk_pairs: int = HOST_CHUNK_PAIRS) -> Aggregated:
    """:func:`aggregate_host` over chunks of whole images of about ``chunk_pairs`` (descriptor, word) pairs each,
    so that its sort keys and temporaries stay bounded whatever the input's size; the same rows and bits.

    Args:
        centroids: ``[K, D] float32``; vecs: ``[N, D] float32``; word_ids: ``[N, MA] int32``; image_ids: ``[N] int``
            grouped ascending.

    Returns:
        :class:`Aggregated` rows sorted by (image, word).
    """
    n, ma = word_ids.shape
    if n * ma <= chunk_pairs:
        return aggregate_host(centroids, vecs, word_ids, image_ids)
    parts = [aggregate_host(centroids, vecs[s:e], word_ids[s:e], image_ids[s:e])
             for s, e in image_chunks(image_ids, max(1, chunk_pairs // ma), n)]
    return Aggregated(*(np.concatenate(column) for column in zip(*parts)))


def aggregate_host(centroids: np.ndarray, vecs: np.ndarray, word_ids: np.ndarray, image_ids: np.ndarray, *,
                   compiled: bool = True):
    """ASMK* aggregation in numpy, bit for bit :func:`aggregate_padded`'s: each cell's residuals are summed in
    float32 in descriptor order (the first member, then one member at a time), then binarized and packed.

    Args:
        centroids: ``[K, D] float32`` host array; vecs: ``[N, D] float32``; word_ids: ``[N, MA] int32`` (negative:
            no assignment); image_ids: ``[N] int`` grouped ascending.
        compiled: sum with the compiled CPU kernel where numba is there (else numpy; the same bits).

    Returns:
        :class:`Aggregated` rows sorted by (image, word).
    """
    n, ma = word_ids.shape
    d = vecs.shape[1]
    width = packed_width(d)
    words = np.asarray(word_ids, np.int64).reshape(-1)
    imgs = np.repeat(np.asarray(image_ids, np.int64), ma)
    desc = np.repeat(np.arange(n), ma)
    valid = words >= 0
    if not valid.all():
        words, imgs, desc = words[valid], imgs[valid], desc[valid]
    m = words.shape[0]
    if m == 0:
        return Aggregated(np.zeros((0, width), np.uint32), np.zeros((0,), np.int32), np.zeros((0,), np.int32))
    order = np.lexsort((words, imgs))  # stable: descriptor order inside each (image, word) cell
    w, im, dsc = words[order], imgs[order], desc[order]
    new = np.empty(m, bool)
    new[0] = True
    new[1:] = (w[1:] != w[:-1]) | (im[1:] != im[:-1])
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, m))
    if compiled and cpu_kernel.available():  # one pass, no temporaries: the same float32 sums and bits
        packed = cpu_kernel.aggregate_binary(vecs, centroids, dsc, w, starts, sizes, width)
        return Aggregated(packed, w[starts].astype(np.int32), im[starts].astype(np.int32))
    acc = vecs[dsc[starts]] - centroids[w[starts]]
    for r in range(1, int(sizes.max())):  # the r-th member of every cell that has one, in order
        cells = np.flatnonzero(sizes > r)
        p = starts[cells] + r
        acc[cells] += vecs[dsc[p]] - centroids[w[p]]
    bits = np.packbits(acc > 0, axis=1, bitorder="big")
    if bits.shape[1] != 4 * width:
        bits = np.pad(bits, ((0, 0), (0, 4 * width - bits.shape[1])))
    packed = np.ascontiguousarray(bits).view(">u4").astype(np.uint32)
    return Aggregated(packed, w[starts].astype(np.int32), im[starts].astype(np.int32))


def _plan_calls(bounds: np.ndarray, call_rows: int):
    """Group consecutive chunks into calls whose descriptors span at most ``call_rows`` rows:
    ``[(row start, row stop, chunk index start, chunk index stop)]``."""
    calls, c = [], 0
    while c < len(bounds):
        d = c + 1
        while d < len(bounds) and bounds[d, 1] - bounds[c, 0] <= call_rows:
            d += 1
        calls.append((int(bounds[c, 0]), int(bounds[d - 1, 1]), c, d))
        c = d
    return calls


def aggregate(centroids, vecs: np.ndarray, word_ids: np.ndarray, image_ids: np.ndarray, *, binary: bool,
              chunk_descriptors: int = 8192, sort: bool = True) -> Aggregated:
    """Aggregate validated descriptors image by image, in chunks of whole images.

    ASMK* with host centroids is summed on the host where :func:`host_serves` says so (on the CPU backend: always,
    with the compiled kernel); the rest is jitted. The jitted path's descriptors go to the device through two
    reused, aligned staging buffers of up to 131072 rows (shared with the device rather than copied on the CPU);
    each buffer is one :func:`aggregate_chunks` call over the chunks it holds, and the rows of one call are
    compacted on the host while the next call runs.

    Args:
        centroids: ``[K, D] float32``.
        vecs: ``[N, D] float32`` descriptors.
        word_ids: ``[N, MA] int32`` assigned words.
        image_ids: ``[N] int`` grouped, ascending image ids.
        binary: ASMK* (packed sign bits) if True, ASMK (unit real vectors) if False.
        chunk_descriptors: descriptors per chunk (whole images; an image larger than that is a chunk of its own).
        sort: sort each image's rows by word (as asmk emits them); ``False`` leaves them in any order within
            an image (first occurrence on the jitted path; what is aggregated on the host comes sorted), which
            the index and the scorer accept.

    Returns:
        :class:`Aggregated` rows, grouped by image in ascending id order, as host arrays.
    """
    k, d = centroids.shape
    width = packed_width(d) if binary else d
    dtype = np.uint32 if binary else np.float32
    n, ma = word_ids.shape
    if n == 0:
        return Aggregated(np.zeros((0, width), dtype), np.zeros((0,), np.int32), np.zeros((0,), np.int32))
    if host_serves(n * ma, binary=binary, centroids=centroids):
        return aggregate_host_chunked(centroids, np.asarray(vecs, np.float32), word_ids, image_ids)
    centroids = jnp.asarray(centroids)
    max_images = max(1, min(4096, (2**31 - 1) // k - 1))  # slot * K + word must fit in int32
    bounds = np.asarray(image_chunks(image_ids, chunk_descriptors, max_images), np.int64)
    cap = _bucket(int((bounds[:, 1] - bounds[:, 0]).max()))
    n_slots = _bucket(max(int(np.count_nonzero(np.diff(image_ids[s:e]))) + 1 for s, e in bounds), minimum=1)
    calls = _plan_calls(bounds, max(cap, _CALL_ROWS))
    rows = _bucket(max(e - s for s, e, _, _ in calls))  # staging rows (>= cap)
    n_chunks = _bucket(max(b - a for _, _, a, b in calls), minimum=1)
    extra_cap = _bucket(cap * ma // 4)
    kwargs = dict(binary=binary, cap=cap, n_slots=n_slots)
    staging = [(aligned_empty((rows, d), np.float32), aligned_empty((rows, ma), np.int32),
                aligned_empty((rows,), np.int32)) for _ in range(min(2, len(calls)))]
    out_vecs, out_words, out_images = [], [], []
    pending = None

    def collect(item):
        res, args, sb = item
        agg, words, images, n_extra = res
        n_extra = np.asarray(n_extra)
        agg, words, images = np.asarray(agg), np.asarray(words), np.asarray(images)
        redo = np.flatnonzero(n_extra > extra_cap)
        if redo.size:  # bursty chunks: redo them with room for every pair
            full = aggregate_chunks(*args, sb[redo, 0], sb[redo, 1], extra_cap=cap * ma, **kwargs)
            agg, words, images = agg.copy(), words.copy(), images.copy()
            agg[redo], words[redo], images[redo] = (np.asarray(x) for x in full[:3])
        keep = images != PAD_IMAGE
        out_vecs.append(agg[keep])
        out_words.append(words[keep])
        out_images.append(images[keep])

    for t, (r0, r1, c0, c1) in enumerate(calls):
        x, w, im = staging[t % len(staging)]  # free: the call that used it was collected
        x[: r1 - r0] = vecs[r0:r1]
        w[: r1 - r0] = word_ids[r0:r1]
        im[: r1 - r0] = image_ids[r0:r1]
        sb = np.zeros((n_chunks, 2), np.int32)  # padding chunks are empty (start == stop == 0)
        sb[: c1 - c0] = bounds[c0:c1] - r0
        args = (centroids, jax.device_put(x), jax.device_put(w), jax.device_put(im))
        res = aggregate_chunks(*args, sb[:, 0], sb[:, 1], extra_cap=extra_cap, **kwargs)
        if pending is not None:  # compact the previous call's rows while this one runs
            collect(pending)
        pending = (res, args, sb)
    collect(pending)
    agg = Aggregated(np.concatenate(out_vecs), np.concatenate(out_words), np.concatenate(out_images))
    return _sort_rows(agg) if sort else agg

__all__ = ["Aggregated", "COMPILED_HOST_PAIRS", "HOST_CHUNK_PAIRS", "HOST_PAIRS", "PAD_IMAGE", "aggregate",
           "aggregate_chunks", "aggregate_host", "aggregate_host_chunked", "aggregate_padded", "aligned_empty",
           "binarize_and_pack", "host_serves", "image_chunks", "normalize_l2", "packed_width"]
