"""Inverted file: per-word posting lists of aggregated residuals, as a registered PyTree.

Postings are stored word-major: the entries of word ``w`` are ``entry_*[word_offsets[w]:word_offsets[w] +
counts[w]]``, in insertion (image) order. The arrays are padded to a multiple of :data:`ENTRY_BLOCK` rows
(padding rows have image ``PAD_IMAGE``), so that the scorer can scan them in fixed-size blocks. Static shape
fields (``n_images``, ``n_entries``, ``max_count``...) are PyTree metadata, so jitted functions specialize on them.

Semantics follow asmk 0.1.1: ``idf[w] = log(n_images / counts[w])**2`` refreshed for the words an add
touches (other words keep their value, empty words keep 1), and the per-image normalization is the
sum of ``idf`` over the image's entries (the entry count when idf is off).

Building is host-side bookkeeping (a stable radix sort of the new rows by word, bincounts); the arrays then
live on the JAX device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from .aggregate import PAD_IMAGE, Aggregated, aligned_empty, packed_width

log = logging.getLogger(__name__)

ENTRY_BLOCK = 4096  # posting arrays are padded to a multiple of this many rows

_DATA = ["centroids", "entry_vecs", "entry_words", "entry_images", "word_offsets", "counts", "idf", "norm_factor"]
_META = ["n_images", "n_entries", "max_count", "imid_offset", "binary", "use_idf", "dim", "codebook_size_param"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=_DATA, meta_fields=_META)
@dataclasses.dataclass(frozen=True)
class Index:
    """An ASMK inverted file with its codebook.

    Attributes:
        centroids: ``[K, D] float32`` codebook.
        entry_vecs: ``[E_pad, W] uint32`` packed bits (binary) or ``[E_pad, D] float32`` unit vectors.
        entry_words: ``[E_pad] int32`` word of each entry (padding: 0).
        entry_images: ``[E_pad] int32`` internal image id of each entry (padding: ``PAD_IMAGE``).
        word_offsets: ``[K + 1] int32`` start of each word's postings.
        counts: ``[K] int32`` postings per word.
        idf: ``[K] float32`` inverse document frequency weights (all ones when ``use_idf`` is off).
        norm_factor: ``[n_images] float32`` per-image normalization (sum of idf over its entries).
        n_images: number of internal image slots (largest internal id + 1).
        n_entries: number of real entries ``E`` (``E_pad`` is ``E`` rounded up to :data:`ENTRY_BLOCK`).
        max_count: longest posting list.
        imid_offset: internal ids of added images are their ids plus this (asmk's distractor offset);
            query ranks are reported minus it.
        binary: ASMK* (packed sign bits) or ASMK (real vectors).
        use_idf: whether adds refresh idf.
        dim: descriptor dimension ``D``.
        codebook_size_param: the codebook ``size`` parameter (for asmk's params schema).
    """

    centroids: jax.Array
    entry_vecs: jax.Array
    entry_words: jax.Array
    entry_images: jax.Array
    word_offsets: jax.Array
    counts: jax.Array
    idf: jax.Array
    norm_factor: jax.Array
    n_images: int
    n_entries: int
    max_count: int
    imid_offset: int
    binary: bool
    use_idf: bool
    dim: int
    codebook_size_param: object = None

    @property
    def n_words(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def width(self) -> int:
        return int(self.entry_vecs.shape[1])

    def stats(self) -> dict:
        """Posting-list statistics, with asmk's ``ivf_stats`` keys."""
        counts = np.asarray(self.counts).astype(np.float64)
        total = counts.sum()
        return {
            "images": self.n_images,
            "vectors_per_image": total / (self.n_images or 1),
            "mean_entries_per_vw": counts.mean(),
            "empty_vw": int((counts == 0).sum()),
            "min_entries_per_vw": int(counts.min()),
            "max_entries_per_vw": int(counts.max()),
            "std_of_entries_per_vw": counts.std(),
            "imbalance_factor_of_vw": counts.shape[0] * (counts**2).sum() / (total**2 or 1),
        }


def entries(index: Index):
    """The real postings as host arrays, word-major: ``(vecs [E, W], words [E] int32, images [E] int32)``."""
    e = index.n_entries
    return (np.asarray(index.entry_vecs)[:e], np.asarray(index.entry_words)[:e],
            np.asarray(index.entry_images)[:e])


def _word_sort(words: np.ndarray, n_words: int) -> np.ndarray:
    """Stable permutation sorting ``words`` (a radix sort when the ids fit in 16 bits)."""
    return np.argsort(words.astype(np.uint16 if n_words <= 1 << 16 else np.int32), kind="stable")


def _padded(a: np.ndarray, order, e_pad: int, fill) -> jax.Array:
    """``a[order]`` (or ``a``) in a new aligned ``e_pad``-row buffer, the tail set to ``fill``, as a JAX array
    (shared with the buffer on the CPU, so the rows are copied once)."""
    e = a.shape[0] if order is None else order.shape[0]
    out = aligned_empty((e_pad,) + a.shape[1:], a.dtype)
    if order is None:
        out[:e] = a
    else:
        np.take(a, order, axis=0, out=out[:e])
    out[e:] = fill
    return jax.device_put(out)


def from_postings(centroids, vecs, words, images, *, idf, norm_factor, n_images: int, imid_offset: int,
                  binary: bool, use_idf: bool, codebook_size_param=None, order=None) -> Index:
    """An :class:`Index` from word-major sorted postings (host arrays), padded for the scorer.

    Args:
        centroids: ``[K, D] float32``.
        vecs: ``[E, W]`` posting vectors; words, images: ``[E] int`` (words non-decreasing).
        idf: ``[K]`` word weights; norm_factor: ``[n_images]`` image normalizations.
        order: optional ``[E]`` permutation: the postings are ``vecs[order]``, ``words[order]``, ``images[order]``.
    """
    centroids = jnp.asarray(centroids, jnp.float32)
    k, d = centroids.shape
    width = packed_width(d) if binary else d
    dtype = np.uint32 if binary else np.float32
    vecs = np.asarray(vecs, dtype).reshape(-1, width)
    words = np.asarray(words, np.int32)
    images = np.asarray(images, np.int32)
    e = int(words.shape[0] if order is None else order.shape[0])
    counts = np.bincount(words, minlength=k).astype(np.int32) if e else np.zeros(k, np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32)
    e_pad = max(ENTRY_BLOCK, -(-e // ENTRY_BLOCK) * ENTRY_BLOCK)
    return Index(
        centroids=centroids,
        entry_vecs=_padded(vecs, order, e_pad, 0), entry_words=_padded(words, order, e_pad, 0),
        entry_images=_padded(images, order, e_pad, PAD_IMAGE),
        word_offsets=jnp.asarray(offsets), counts=jnp.asarray(counts),
        idf=jnp.asarray(np.asarray(idf, np.float32)), norm_factor=jnp.asarray(np.asarray(norm_factor, np.float32)),
        n_images=int(n_images), n_entries=e, max_count=int(counts.max()) if e else 0, imid_offset=int(imid_offset),
        binary=bool(binary), use_idf=bool(use_idf), dim=int(d),
        codebook_size_param=k if codebook_size_param is None else codebook_size_param,
    )


def empty(centroids, *, binary: bool, use_idf: bool, codebook_size_param=None) -> Index:
    """An index with no entries over the codebook ``centroids`` (``[K, D] float32``)."""
    k, d = np.shape(centroids)
    width = packed_width(d) if binary else d
    return from_postings(centroids, np.zeros((0, width)), np.zeros(0, np.int32), np.zeros(0, np.int32),
                         idf=np.ones(k, np.float32), norm_factor=np.zeros(0, np.float32), n_images=0,
                         imid_offset=0, binary=binary, use_idf=use_idf, codebook_size_param=codebook_size_param)


def add(index: Index, agg: Aggregated) -> Index:
    """Return ``index`` with the aggregated images ``agg`` appended (asmk's ``IVF.add``).

    The new image ids are shifted by ``index.imid_offset`` and must not be below ``index.n_images``
    (images are added in ascending id order and never twice). ``agg`` rows must be grouped by image in
    ascending order (their order within an image does not matter).
    """
    width = index.width
    if agg.vecs.ndim != 2 or agg.vecs.shape[1] != width:
        raise ValueError(f"aggregated vectors have shape {agg.vecs.shape}, the index holds width {width}")
    if agg.words.shape[0] == 0:
        raise ValueError("nothing to add: no aggregated entries")
    images = np.asarray(agg.images, np.int64) + index.imid_offset
    if images.min() < index.n_images:
        raise ValueError(
            f"image id {int(images.min()) - index.imid_offset} is already in the index "
            f"(it holds internal ids below {index.n_images}); add new images with larger ids"
        )
    k = index.n_words
    n_images = max(index.n_images, int(images.max()) + 1)
    new_words = np.asarray(agg.words, np.int32)
    new_images = images.astype(np.int32)
    order = _word_sort(new_words, k)
    if index.n_entries:  # merge the two word-major lists (old postings first within a word)
        old_vecs, old_words, old_images = entries(index)
        sorted_words = new_words[order]
        at = np.searchsorted(old_words, sorted_words, side="right")
        words = np.insert(old_words, at, sorted_words)
        imgs = np.insert(old_images, at, new_images[order])
        vecs = np.insert(old_vecs, at, np.asarray(agg.vecs)[order], axis=0)
        order = None
    else:  # postings are the new rows in word order: permuted straight into the padded arrays
        words, imgs, vecs = new_words, new_images, np.asarray(agg.vecs)
    idf = np.asarray(index.idf, np.float32).copy()
    counts = np.bincount(words, minlength=k)
    if index.use_idf:
        touched = np.flatnonzero(np.bincount(new_words, minlength=k))
        idf[touched] = np.log(n_images / counts[touched]) ** 2
    norm = np.bincount(imgs, weights=idf[words], minlength=n_images)
    log.debug("ivf add: %d entries, %d images", words.shape[0], n_images)
    return from_postings(index.centroids, vecs, words, imgs, idf=idf, norm_factor=norm, n_images=n_images,
                         imid_offset=index.imid_offset, binary=index.binary, use_idf=index.use_idf,
                         codebook_size_param=index.codebook_size_param, order=order)


def with_distractors(index: Index) -> Index:
    """Use ``index`` as a distractor set: later adds are numbered after its images (asmk's ``imid_offset``)."""
    return dataclasses.replace(index, imid_offset=index.n_images)
