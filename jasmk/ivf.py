"""Inverted file: per-word posting lists of aggregated residuals, as a registered PyTree.

Postings are stored word-major: the entries of word ``w`` are ``entry_*[word_offsets[w]:word_offsets[w] +
counts[w]]``, in insertion (image) order, and the arrays carry a padding tail so that any fixed-size
window gather stays in bounds. Static shape fields (``n_images``, ``n_entries``, ``max_count``...) are
PyTree metadata, so jitted functions specialize on them.

Semantics follow asmk 0.1.1: ``idf[w] = log(n_images / counts[w])**2`` refreshed for the words an add
touches (other words keep their value, empty words keep 1), and the per-image normalization is the
sum of ``idf`` over the image's entries (the entry count when idf is off).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from .aggregate import Aggregated

log = logging.getLogger(__name__)

_DATA = ["centroids", "entry_vecs", "entry_words", "entry_images", "word_offsets", "counts", "idf", "norm_factor"]
_META = ["n_images", "n_entries", "max_count", "imid_offset", "binary", "use_idf", "dim", "codebook_size_param"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=_DATA, meta_fields=_META)
@dataclasses.dataclass(frozen=True)
class Index:
    """An ASMK inverted file with its codebook.

    Attributes:
        centroids: ``[K, D] float32`` codebook.
        entry_vecs: ``[E + pad, W] uint32`` packed bits (binary) or ``[E + pad, D] float32`` unit vectors.
        entry_words: ``[E + pad] int32`` word of each entry (padding: 0).
        entry_images: ``[E + pad] int32`` internal image id of each entry (padding: 0).
        word_offsets: ``[K + 1] int32`` start of each word's postings.
        counts: ``[K] int32`` postings per word.
        idf: ``[K] float32`` inverse document frequency weights (all ones when ``use_idf`` is off).
        norm_factor: ``[n_images] float32`` per-image normalization (sum of idf over its entries).
        n_images: number of internal image slots (largest internal id + 1).
        n_entries: number of real entries ``E``.
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


def empty(centroids, *, binary: bool, use_idf: bool, codebook_size_param=None) -> Index:
    """An index with no entries over the codebook ``centroids`` (``[K, D] float32``)."""
    centroids = jnp.asarray(centroids, jnp.float32)
    k, d = centroids.shape
    width = -(-d // 32) if binary else d
    dtype = jnp.uint32 if binary else jnp.float32
    return Index(
        centroids=centroids,
        entry_vecs=jnp.zeros((1, width), dtype),
        entry_words=jnp.zeros((1,), jnp.int32),
        entry_images=jnp.zeros((1,), jnp.int32),
        word_offsets=jnp.zeros((k + 1,), jnp.int32),
        counts=jnp.zeros((k,), jnp.int32),
        idf=jnp.ones((k,), jnp.float32),
        norm_factor=jnp.zeros((0,), jnp.float32),
        n_images=0, n_entries=0, max_count=0, imid_offset=0,
        binary=bool(binary), use_idf=bool(use_idf), dim=int(d),
        codebook_size_param=k if codebook_size_param is None else codebook_size_param,
    )


@functools.partial(jax.jit, static_argnames=("n_words", "n_images", "use_idf"))
def _assemble(vecs, words, images, new_mask, old_idf, *, n_words: int, n_images: int, use_idf: bool):
    """Sort entries word-major (stable, so insertion order is kept) and derive counts, offsets, idf, norms.

    Args:
        vecs: ``[E, W]`` entry vectors; words, images: ``[E] int32``; new_mask: ``[E] bool`` entries of
            this add; old_idf: ``[K] float32``.
    """
    order = jnp.argsort(words, stable=True)
    words, images, vecs = words[order], images[order], vecs[order]
    counts = jnp.bincount(words, length=n_words).astype(jnp.int32)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])
    if use_idf:
        touched = jnp.bincount(words, weights=new_mask[order].astype(jnp.float32), length=n_words) > 0
        fresh = jnp.log(n_images / jnp.maximum(counts, 1).astype(jnp.float32)) ** 2
        idf = jnp.where(touched, fresh, old_idf)
    else:
        idf = old_idf
    norm = jax.ops.segment_sum(idf[words], images, num_segments=n_images)
    return vecs, words, images, offsets, counts, idf, norm


def add(index: Index, agg: Aggregated) -> Index:
    """Return ``index`` with the aggregated images ``agg`` appended (asmk's ``IVF.add``).

    The new image ids are shifted by ``index.imid_offset`` and must not be below ``index.n_images``
    (images are added in ascending id order and never twice).
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
    n_images = max(index.n_images, int(images.max()) + 1)
    e_old = index.n_entries
    vecs = jnp.concatenate([index.entry_vecs[:e_old], jnp.asarray(agg.vecs)])
    words = jnp.concatenate([index.entry_words[:e_old], jnp.asarray(agg.words, jnp.int32)])
    imgs = jnp.concatenate([index.entry_images[:e_old], jnp.asarray(images, jnp.int32)])
    new_mask = jnp.arange(words.shape[0]) >= e_old
    vecs, words, imgs, offsets, counts, idf, norm = _assemble(
        vecs, words, imgs, new_mask, index.idf, n_words=index.n_words, n_images=n_images, use_idf=index.use_idf
    )
    max_count = int(jnp.max(counts))
    pad = max(max_count, 1)
    log.debug("ivf add: %d entries, %d images, longest posting list %d", words.shape[0], n_images, max_count)
    return dataclasses.replace(
        index,
        entry_vecs=jnp.concatenate([vecs, jnp.zeros((pad, width), vecs.dtype)]),
        entry_words=jnp.concatenate([words, jnp.zeros((pad,), jnp.int32)]),
        entry_images=jnp.concatenate([imgs, jnp.zeros((pad,), jnp.int32)]),
        word_offsets=offsets,
        counts=counts,
        idf=idf,
        norm_factor=norm,
        n_images=n_images,
        n_entries=int(words.shape[0]),
        max_count=max_count,
    )


def with_distractors(index: Index) -> Index:
    """Use ``index`` as a distractor set: later adds are numbered after its images (asmk's ``imid_offset``)."""
    return dataclasses.replace(index, imid_offset=index.n_images)
