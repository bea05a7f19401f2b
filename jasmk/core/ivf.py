"""Inverted file: per-word posting lists of aggregated residuals, stored as image-range segments.

An :class:`Index` is a registered PyTree holding the codebook, the global per-word statistics (``counts``,
``idf``) and a tuple of :class:`Segment` objects. Each segment covers a contiguous range of internal image ids
``[image_start, image_start + n_images)`` (segments tile ``[0, n_images)`` in order) and stores that range's
postings word-major: the postings of word ``w`` are rows ``offsets[w]:offsets[w + 1]`` of ``vecs`` / ``words`` /
``images``, in ascending image order (asmk's list order). Every array is padded to a capacity taken from a
short ladder (:func:`capacity`), and nothing that grows with the data is a static field, so jitted scorers
compile once per capacity step, not once per add.

Adding images is amortized O(rows added): the new rows become a new segment (a stable radix sort of those
rows only), and trailing segments are merged geometrically, as search engines merge index segments: the last
two are merged while the older one holds at most :data:`MERGE_RATIO` times the postings of the newer one, up
to :data:`MAX_SEGMENT_IMAGES` images per segment (which bounds the score accumulator of one segment) and
:data:`MAX_SEGMENT_ENTRIES` postings (int32 positions). Each posting is therefore copied O(log n) times over the
life of an index, and an index has O(log n) segments plus one per full ``MAX_SEGMENT_IMAGES`` range.

Semantics follow asmk 0.1.1: ``idf[w] = log(n_images / counts[w])**2`` refreshed for the words an add touches
(other words keep their value, empty words keep 1), and the per-image normalization is the sum of ``idf`` over
the image's entries (the entry count when idf is off). With idf on, that sum changes for every image on every
add (asmk recomputes it over the whole index too); jasmk recomputes it vectorized per segment, O(index).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging

import jax
import numpy as np

from . import memory
from .aggregate import PAD_IMAGE, Aggregated, aligned_empty, packed_width
from .names import ImageNames
from .validate import is_int

log = logging.getLogger(__name__)

ENTRY_BLOCK = 4096  # posting capacities are multiples of this (the dense scan's largest block)
MAX_SEGMENT_IMAGES = 1 << 17  # image slots per segment: bounds one segment's [B, images] score accumulator
MAX_SEGMENT_ENTRIES = 1 << 30  # postings per segment (int32 positions with room to spare)
IMAGE_STEPS = 1  # image capacities are powers of two: a growing segment needs a new program once per doubling
MERGE_RATIO = 2  # merge the last two segments while the older holds <= this times the newer's postings


def capacity(n: int, *, minimum: int = ENTRY_BLOCK, multiple: int = 1, steps: int = 8) -> int:
    """A size >= ``n`` from a short ladder (``steps`` sizes per octave, a power of two), rounded up to
    ``multiple``: the shapes that grow with the data (postings, images, query rows, touched pairs) take few
    distinct values, so jitted functions compile once per step."""
    n = max(int(n), int(minimum), 1)
    top = 1 << (n - 1).bit_length()
    step = max(top // (2 * steps), 1)
    n = -(-n // step) * step
    return -(-n // multiple) * multiple


def _scalar(n) -> np.ndarray:
    return np.asarray(int(n), np.int32)


def inverse_sqrt(norm: np.ndarray) -> np.ndarray:
    """``1 / sqrt(norm)`` in float32 where ``norm > 0``, else 0."""
    norm = np.asarray(norm, np.float32)
    out = np.zeros_like(norm)
    pos = norm > 0
    out[pos] = np.float32(1) / np.sqrt(norm[pos])
    return out


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["vecs", "words", "images", "offsets", "norm_factor", "scale", "image_start",
                                "n_images"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Segment:
    """The postings of one contiguous range of images, word-major.

    Attributes:
        vecs: ``[C, W] uint32`` packed bits (binary) or ``[C, D] float32`` unit vectors; rows past the real
            postings are zero.
        words: ``[C] int32`` word of each posting (padding: 0).
        images: ``[C] int32`` image of each posting, relative to ``image_start`` (padding: ``PAD_IMAGE``).
        offsets: ``[K + 1] int32`` start of each word's postings (``offsets[K]`` is the posting count).
        norm_factor: ``[I] float32`` normalization of each image of the range (sum of idf over its entries;
            0 for images without entries and for the padding slots past ``n_images``).
        scale: ``[I] float32`` ``1 / sqrt(norm_factor)`` (0 where the norm is 0), computed once on the host so
            that every scoring kernel multiplies by the same bits.
        image_start: ``[] int32`` internal id of the first image of the range.
        n_images: ``[] int32`` images in the range (``<= I``).
    """

    vecs: jax.Array
    words: jax.Array
    images: jax.Array
    offsets: jax.Array
    norm_factor: jax.Array
    scale: jax.Array
    image_start: jax.Array
    n_images: jax.Array
    #: host and device copies made on demand (:func:`host`, :func:`on_device`): neither a PyTree leaf nor static
    #: metadata, so checkpoints and jit cache keys do not see it; a PyTree transform starts with an empty one
    caches: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_entries(self) -> int:
        return int(host(self).offsets[-1])

    @property
    def capacity(self) -> int:
        return int(self.vecs.shape[0])

    @property
    def image_capacity(self) -> int:
        return int(self.norm_factor.shape[0])


@dataclasses.dataclass(frozen=True)
class HostSegment:
    """Host (numpy) views of a segment's arrays, made once per segment (zero-copy on the CPU backend)."""

    vecs: np.ndarray
    words: np.ndarray
    images: np.ndarray
    offsets: np.ndarray
    norm_factor: np.ndarray
    scale: np.ndarray
    image_start: int
    n_images: int


def on_device(tree):
    """``tree`` (a :class:`Segment` or :class:`Index`) with its arrays on the default JAX device, cached on the
    object: segments are made on the host (a transfer call costs ~0.15 ms on the CPU, more than a small add),
    and the XLA kernels move each segment once, the first time they score it. ``jax.device_put(index)`` moves a
    whole index at once (do that before calling :func:`jasmk.query_padded` in a loop)."""
    cached = tree.caches.get("device")
    if cached is None:
        if all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(tree)):
            return tree
        cached = tree.caches["device"] = jax.device_put(tree)
    return cached


def host(seg: Segment) -> HostSegment:
    """Cached numpy views of ``seg`` (the segment's arrays never change: segments are immutable)."""
    cached = seg.caches.get("host")
    if cached is None:
        cached = seg.caches["host"] = HostSegment(
            np.asarray(seg.vecs), np.asarray(seg.words), np.asarray(seg.images), np.asarray(seg.offsets),
            np.asarray(seg.norm_factor), np.asarray(seg.scale), int(seg.image_start), int(seg.n_images))
    return cached


@dataclasses.dataclass(frozen=True)
class Reservation:
    """Room reserved in an index for ``images`` more images holding ``postings`` postings (:func:`reserve`).

    Images added after the reservation go into segments of fixed shapes: an open segment of ``block`` image slots
    that each add refills, sealed when full, and sealed segments merged pairwise as a binary counter, so a segment
    of level ``j`` holds exactly ``block * 2**j`` images in :meth:`shape` ``(j)``. Every shape the run will
    need is known up front (:meth:`shapes`), which is what lets the XLA kernels be compiled once, before the run.

    Attributes:
        images, postings: what the run will hold at most (beyond it: new shapes, one per doubling).
        query_rows: aggregated rows of one query image the query batches are padded to at least.
        base: internal id of the first image after the reservation (segments before it keep their shapes).
        block: image slots of a level-0 (open) segment, a power of two.
    """

    images: int
    postings: int
    query_rows: int
    base: int
    block: int

    @property
    def per_image(self) -> int:
        return max(1, -(-int(self.postings) // max(int(self.images), 1)))

    @property
    def levels(self) -> int:
        """Number of levels the reserved images need (level 0 included)."""
        top = min(max(int(self.images), self.block), MAX_SEGMENT_IMAGES)
        return max(1, (top // self.block).bit_length())

    def shape(self, level: int) -> tuple[int, int]:
        """``(posting capacity, image capacity)`` of a segment of ``level``: powers of two."""
        images = self.block << int(level)
        postings = max(ENTRY_BLOCK, 1 << (self.per_image * images - 1).bit_length())
        return postings, images

    def shapes(self) -> list:
        """Every segment shape of a run within the reservation."""
        return [self.shape(j) for j in range(self.levels)]


def reserve(index: "Index", *, images: int, postings: int, query_rows: int | None = None) -> "Index":
    """``index`` with room reserved for ``images`` more images holding ``postings`` postings in all
    (:class:`Reservation`); ``query_rows``: aggregated rows of one query image (default: ``min(K, 8 x postings
    per image)``, enough for a query with up to 8 words per descriptor). Scores do not change."""
    for value, name in ((images, "images"), (postings, "postings")):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if images > 2**31 - 2 - index.n_images:
        raise ValueError(f"cannot reserve {images} images: internal ids are int32")
    per_image = max(1, -(-int(postings) // int(images)))
    if query_rows is None:
        query_rows = min(index.n_words, 8 * per_image)
    elif not is_int(query_rows) or query_rows < 1:
        raise ValueError(f"query_rows must be a positive int or None, got {query_rows!r}")
    block = 1 << max(4, min(12, (int(images) // 128).bit_length() - 1)) if images >= 256 else 16
    block = min(block, MAX_SEGMENT_IMAGES)
    res = Reservation(images=int(images), postings=int(postings), query_rows=int(query_rows),
                      base=int(index.n_images), block=int(block))
    log.info("reserved %d images / %d postings: %d segment shapes %s", images, postings, res.levels, res.shapes())
    return dataclasses.replace(index, reservation=res)


def _add_reserved(segments: list, res: Reservation, vecs, words, images, old_n: int, n_images: int, norm_new,
                  n_words: int) -> list:
    """Append images ``[old_n, n_images)`` to ``segments`` on the reservation's shapes (see :class:`Reservation`):
    block by block into the open segment, sealed blocks merged as a binary counter."""
    pos = old_n
    while pos < n_images:
        boundary = res.base + ((pos - res.base) // res.block + 1) * res.block
        stop = min(n_images, boundary)
        r0, r1 = (int(np.searchsorted(images, x, side="left")) for x in (pos, stop))
        pv, pw, pi = vecs[r0:r1], words[r0:r1], images[r0:r1]
        pnorm, start = norm_new[pos - old_n:stop - old_n], pos
        last = host(segments[-1]) if segments else None
        if last is not None and last.image_start >= res.base and last.n_images < res.block:  # the open segment:
            ov, ow, oi = _segment_entries(segments.pop())  # remade with the new images (one pass, one sort)
            pv, pw, pi = np.concatenate([ov, pv]), np.concatenate([ow, pw]), np.concatenate([oi, pi])
            pnorm, start = np.concatenate([last.norm_factor[:last.n_images], pnorm]), last.image_start
        # stable sort by word: the open segment's postings (lower images) stay first within each word
        segments.append(make_segment(pv, pw, pi, image_start=start, n_images=stop - start, norm_factor=pnorm,
                                     n_words=n_words, shape=res.shape(0)))
        if stop == boundary:  # sealed: merge equal neighbours (levels of a binary counter)
            while len(segments) >= 2:
                a, b = host(segments[-2]), host(segments[-1])
                if a.image_start < res.base or a.n_images != b.n_images or not _mergeable(
                        segments[-2], segments[-1], eager=True):
                    break
                level = (2 * a.n_images // res.block).bit_length() - 1
                b_seg = segments.pop()
                segments[-1] = merge_segments(segments[-1], b_seg, n_words, shape=res.shape(level))
        pos = stop
    return segments


class IdMap:
    """The sorted names of an index's images: ``names[slot]`` is the name (user id plus ``imid_offset``) of the
    image in internal slot ``slot``; slots are dense (``0..n-1``), so memory and time follow the number of
    images, not the largest id.

    Immutable and hashable (it is static metadata of the :class:`Index` PyTree): the hash is a digest of the
    names, computed the first time it is needed (a jit keyed on the index; an add computes none), equality
    compares the names.

    Attributes:
        names: ``[n] int64`` strictly increasing, non-negative.
    """

    __slots__ = ("names", "_digest")

    def __init__(self, names):
        names = np.array(names, dtype=np.int64, copy=True).reshape(-1)
        names.setflags(write=False)
        self.names = names
        self._digest = None

    def __len__(self) -> int:
        return int(self.names.size)

    def __hash__(self) -> int:
        if self._digest is None:
            self._digest = hash((self.names.size, hashlib.blake2b(self.names.tobytes(), digest_size=16).digest()))
        return self._digest

    def __eq__(self, other) -> bool:
        return (isinstance(other, IdMap) and hash(self) == hash(other)
                and np.array_equal(self.names, other.names))

    def __repr__(self) -> str:
        return f"IdMap({self.names.size} names, {self.names[:1].tolist()}..{self.names[-1:].tolist()})"


MAX_NAME = 2**63 - 2  # ids plus imid_offset stay below int64's top


def assign_slots(index, agg: Aggregated):
    """Check the image ids of an add and give each new image its internal slot (shared by :func:`add` and the
    sharded index's add: ``index`` has ``n_images``, ``imid_offset``, ``next_name``, ``ids`` and ``dense_ids``).

    Image ids are names: the new images take the next slots whatever their ids, so gaps cost nothing (except with
    ``dense_ids``, asmk's layout: a slot for every name up to the largest). Names (ids plus ``imid_offset``) must
    be non-negative, grouped ascending and larger than every name already there. The memory the new slots need is
    checked before anything is allocated.

    Returns:
        ``(slots [E] int64, n_images, id_map)``: each row's slot, the slot count after the add and the index's
        new :class:`IdMap` (None while names equal slots).

    Raises:
        ValueError: naming what is wrong with the ids, or the memory they would need.
    """
    old_n = int(index.n_images)
    ids = np.asarray(agg.images, np.int64)
    if ids.min() < 0:
        raise ValueError(f"image ids must be non-negative, got {int(ids.min())}")
    if int(ids.max()) > MAX_NAME - index.imid_offset:
        raise ValueError(f"image id {int(ids.max())} is too large: ids plus the distractor offset "
                         f"{index.imid_offset} must stay below 2**63 - 1")
    names = ids + index.imid_offset
    if ids.size > 1 and (np.diff(names) < 0).any():
        raise ValueError("aggregated rows must be grouped by image in ascending id order")
    next_name = index.next_name
    if int(names[0]) < next_name:
        raise ValueError(
            f"image id {int(names[0]) - index.imid_offset} is not larger than every id already in the index "
            f"(the next free id is {next_name - index.imid_offset}); add new images with larger ids, each once")
    if index.dense_ids:
        if int(names[-1]) > 2**31 - 3:
            raise ValueError(f"image id {int(ids[-1])} does not fit asmk's dense layout (int32 slots)")
        slots, n_images, id_map = names, int(names[-1]) + 1, index.ids
        what = f"adding images up to id {int(ids[-1])}"
        hint = ("this index keeps asmk's dense layout (jasmk.compat): a slot per id up to the largest; "
                "jasmk.build_index keeps only the images there")
    else:
        starts = np.flatnonzero(np.diff(names)) + 1
        new = names[np.concatenate([[0], starts])]
        n_images = old_n + int(new.size)
        if n_images > 2**31 - 2:
            raise ValueError(f"an index holds at most 2**31 - 2 images, this add would make {n_images}")
        slots = np.repeat(np.arange(old_n, n_images, dtype=np.int64),
                          np.diff(np.concatenate([[0], starts, [names.size]])))
        if index.ids is None and int(new[0]) == old_n and int(new[-1]) == n_images - 1:
            id_map = None  # still 0..n-1: names are slots
        else:
            old = index.ids.names if index.ids is not None else np.arange(old_n, dtype=np.int64)
            id_map = IdMap(np.concatenate([old, new]))
        what, hint = f"adding {n_images - old_n} images", "add fewer images at a time"
    memory.require((n_images - old_n) * 24 + add_bytes(agg), what, hint=hint)
    return slots, n_images, id_map


_DATA = ["centroids", "counts", "idf", "segments", "image_slots"]
_META = ["imid_offset", "binary", "use_idf", "dim", "codebook_size_param", "reservation", "ids", "dense_ids",
         "names"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=_DATA, meta_fields=_META)
@dataclasses.dataclass(frozen=True)
class Index:
    """An ASMK inverted file with its codebook.

    Attributes:
        centroids: ``[K, D] float32`` codebook.
        counts: ``[K] int32`` postings per word (over all segments).
        idf: ``[K] float32`` inverse document frequency weights (all ones when ``use_idf`` is off).
        segments: tuple of :class:`Segment`, in image order, tiling ``[0, n_images)``.
        image_slots: ``[] int32`` number of internal image slots, data rather than a static field so that adds
            do not recompile jitted code; :attr:`n_images` is the host int.
        imid_offset: the names of added images are their ids plus this (asmk's distractor offset); query ranks
            are reported minus it.
        binary: ASMK* (packed sign bits) or ASMK (real vectors).
        use_idf: whether adds refresh idf.
        dim: descriptor dimension ``D``.
        codebook_size_param: the codebook ``size`` parameter (for asmk's params schema).
        ids: the :class:`IdMap` from internal slots to names; None while the names are the slots ``0..n-1``.
        dense_ids: asmk's layout: a slot for every name up to the largest, gaps included (:mod:`jasmk.compat`,
            whose idf and full rankings count gap ids as asmk does); False: slots only for the images there.
    """

    centroids: jax.Array
    counts: jax.Array
    idf: jax.Array
    segments: tuple
    image_slots: jax.Array
    imid_offset: int
    binary: bool
    use_idf: bool
    dim: int
    codebook_size_param: object = None
    #: room reserved for growth (:func:`reserve`): segments made on its fixed shapes; not saved in checkpoints
    reservation: "Reservation | None" = None
    ids: "IdMap | None" = None
    dense_ids: bool = False
    names: "ImageNames | None" = None
    #: device copies made on demand (:func:`on_device`, the device idf): neither a PyTree leaf nor static metadata
    caches: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        kind = "ASMK*" if self.binary else "ASMK"
        return (f"Index({kind}, images={self.n_images}, words={self.n_words}, dim={self.dim}, "
                f"postings={self.n_entries}, segments={len(self.segments)}, use_idf={self.use_idf}, "
                f"imid_offset={self.imid_offset})")

    @property
    def n_words(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def n_images(self) -> int:
        """Internal image slots, a host int: the images in the index (plus, for an index with asmk's dense
        layout, the gap ids below the largest)."""
        return int(self.image_slots)

    @property
    def next_name(self) -> int:
        """The smallest name a new image may take (largest name + 1; asmk's ``n_images``)."""
        return int(self.ids.names[-1]) + 1 if self.ids is not None else int(self.image_slots)

    @property
    def image_ids(self) -> np.ndarray:
        """``[n_images] int64`` id of the image in each internal slot (ascending): what column ``j`` of a score
        matrix and slot ``j`` of the index stand for. Distractor images (``imid_offset``) have negative ids."""
        return public_ids(self, np.arange(self.n_images, dtype=np.int64))

    @property
    def width(self) -> int:
        return packed_width(self.dim) if self.binary else int(self.dim)

    @property
    def n_entries(self) -> int:
        """Real postings over all segments."""
        return sum(s.n_entries for s in self.segments)

    @property
    def max_count(self) -> int:
        """Longest posting list."""
        counts = np.asarray(self.counts)
        return int(counts.max()) if counts.size else 0

    @property
    def norm_factor(self) -> np.ndarray:
        """``[n_images] float32`` per-image normalization (host copy, concatenated over segments)."""
        parts = [host(s).norm_factor[: host(s).n_images] for s in self.segments]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def stats(self) -> dict:
        """Posting-list statistics, with asmk's ``ivf_stats`` keys."""
        counts = np.asarray(self.counts).astype(np.float64)
        total = counts.sum()
        n = int(self.n_images)
        return {
            "images": n,
            "vectors_per_image": total / (n or 1),
            "mean_entries_per_vw": counts.mean(),
            "empty_vw": int((counts == 0).sum()),
            "min_entries_per_vw": int(counts.min()),
            "max_entries_per_vw": int(counts.max()),
            "std_of_entries_per_vw": counts.std(),
            "imbalance_factor_of_vw": counts.shape[0] * (counts**2).sum() / (total**2 or 1),
            "segments": len(self.segments),
        }


def entries(index: Index):
    """All real postings as host arrays, word-major with ascending images within a word (asmk's lists):
    ``(vecs [E, W], words [E] int32, images [E] int32)`` with internal image ids."""
    parts = [_segment_entries(s) for s in index.segments]
    if not parts:
        return (np.zeros((0, index.width), np.uint32 if index.binary else np.float32), np.zeros(0, np.int32),
                np.zeros(0, np.int32))
    vecs, words, images = (np.concatenate(x) for x in zip(*parts))
    order = _word_sort(words, index.n_words)  # stable: segments are in image order
    return vecs[order], words[order], images[order]


def _segment_entries(seg: Segment):
    h = host(seg)
    e = int(h.offsets[-1])
    return h.vecs[:e], h.words[:e], h.images[:e] + h.image_start


def public_ids(index, slots) -> np.ndarray:
    """Ids (names minus ``imid_offset``) of the internal ``slots`` (an int array of any shape; -1 stays -1)."""
    slots = np.asarray(slots, np.int64)
    if index.ids is None:
        out = slots - int(index.imid_offset)
    else:
        names = index.ids.names
        out = names[np.clip(slots, 0, max(names.size - 1, 0))] - int(index.imid_offset) if names.size else slots
    return np.where(slots < 0, -1, out) if slots.size and slots.min() < 0 else out


def _word_sort(words: np.ndarray, n_words: int) -> np.ndarray:
    """Stable permutation sorting ``words`` (a radix sort when the ids fit in 16 bits)."""
    return np.argsort(words.astype(np.uint16 if n_words <= 1 << 16 else np.int32), kind="stable")


def _padded(a: np.ndarray, order, cap: int, fill) -> np.ndarray:
    """``a[order]`` (or ``a``) in a new aligned ``cap``-row host buffer, the tail set to ``fill``."""
    e = a.shape[0] if order is None else order.shape[0]
    out = aligned_empty((cap,) + a.shape[1:], a.dtype)
    if order is None:
        out[:e] = a
    else:
        np.take(a, order, axis=0, out=out[:e])
    out[e:] = fill
    return out


def make_segment(vecs, words, images, *, image_start: int, n_images: int, norm_factor, n_words: int,
                 order=None, shape: tuple[int, int] | None = None, local: bool = False) -> Segment:
    """A :class:`Segment` from postings of the images ``[image_start, image_start + n_images)``.

    Args:
        vecs: ``[E, W]``; words: ``[E] int``; images: ``[E] int`` internal (global) image ids, or with ``local``
            ids relative to ``image_start`` (``[E] int32``, as a segment stores them).
        norm_factor: ``[n_images]`` normalization of the range's images.
        order: ``[E]`` permutation putting the postings in word-major order; None when they already are.
        shape: ``(postings, images)`` capacities at least (a reservation's level shape); None: the ladder's.
    """
    words = np.asarray(words, np.int32)
    e = int(words.shape[0])
    if order is None and e > 1 and (np.diff(words) < 0).any():
        order = _word_sort(words, n_words)
    if local:
        rel = np.asarray(images, np.int32)
    else:
        rel = (np.asarray(images, np.int64) - int(image_start)).astype(np.int32)
    counts = np.bincount(words, minlength=n_words) if e else np.zeros(n_words, np.int64)
    offsets = np.zeros(n_words + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    cap, i_cap = _shape(e, n_images, shape)
    norm = np.zeros(i_cap, np.float32)
    norm[:n_images] = norm_factor
    return _segment_from(_padded(np.asarray(vecs), order, cap, 0), _padded(words, order, cap, 0),
                         _padded(rel, order, cap, PAD_IMAGE), offsets, norm, image_start, n_images)


def _shape(entries: int, n_images: int, shape) -> tuple[int, int]:
    """Posting and image capacities of a segment: the ladder's, or ``shape`` where that holds the data."""
    cap = capacity(entries, multiple=ENTRY_BLOCK)
    i_cap = capacity(n_images, minimum=64, steps=IMAGE_STEPS)
    if shape is None:
        return cap, i_cap
    want_cap, want_images = (int(x) for x in shape)
    if entries > want_cap or n_images > want_images:
        log.info("a segment of %d postings and %d images exceeds the reserved shape %s: a new shape (a compilation "
                 "of each XLA kernel that scores it)", entries, n_images, shape)
        return (cap if entries > want_cap else want_cap, i_cap if n_images > want_images else want_images)
    return want_cap, want_images


def merge_segments(a: Segment, b: Segment, n_words: int, *, shape: tuple[int, int] | None = None) -> Segment:
    """One segment holding ``a`` then ``b`` (adjacent image ranges, ``a`` first), in O(postings): within each
    word, ``a``'s postings (lower images) come before ``b``'s, so every row's new position is its old one plus
    the other segment's postings of lower words (and, for ``b``, ``a``'s postings of its own word)."""
    ha, hb = host(a), host(b)
    ea, eb = int(ha.offsets[-1]), int(hb.offsets[-1])
    n_images = ha.n_images + hb.n_images
    e = ea + eb
    cap, i_cap = _shape(e, n_images, shape)
    offsets = np.add(ha.offsets, hb.offsets, dtype=np.int32)  # below MAX_SEGMENT_ENTRIES: no overflow
    dest_a = np.arange(ea, dtype=np.int64) + hb.offsets[ha.words[:ea]]
    dest_b = np.arange(eb, dtype=np.int64) + ha.offsets[hb.words[:eb] + 1]
    vecs = aligned_empty((cap,) + ha.vecs.shape[1:], ha.vecs.dtype)
    words = aligned_empty((cap,), np.int32)
    images = aligned_empty((cap,), np.int32)
    for out, xa, xb, fill in ((vecs, ha.vecs, hb.vecs, 0), (words, ha.words, hb.words, 0)):
        out[dest_a] = xa[:ea]
        out[dest_b] = xb[:eb]
        out[e:] = fill
    images[dest_a] = ha.images[:ea]
    images[dest_b] = hb.images[:eb] + ha.n_images
    images[e:] = PAD_IMAGE
    norm = np.zeros(i_cap, np.float32)
    norm[: ha.n_images] = ha.norm_factor[: ha.n_images]
    norm[ha.n_images:n_images] = hb.norm_factor[: hb.n_images]
    return _segment_from(vecs, words, images, offsets, norm, ha.image_start, n_images)


def _segment_from(vecs, words, images, offsets, norm, image_start: int, n_images: int) -> Segment:
    """A :class:`Segment` over ready host arrays, with its host view cached."""
    scale = inverse_sqrt(norm)
    seg = Segment(vecs=vecs, words=words, images=images, offsets=offsets, norm_factor=norm, scale=scale,
                  image_start=_scalar(image_start), n_images=_scalar(n_images))
    seg.caches["host"] = HostSegment(vecs, words, images, offsets, norm, scale, int(image_start), int(n_images))
    return seg


def _mergeable(a: Segment, b: Segment, *, eager: bool) -> bool:
    ha, hb = host(a), host(b)
    if ha.n_images + hb.n_images > MAX_SEGMENT_IMAGES:
        return False
    ea, eb = int(ha.offsets[-1]), int(hb.offsets[-1])
    if ea + eb > MAX_SEGMENT_ENTRIES:
        return False
    return eager or ea <= MERGE_RATIO * eb


def _compact(segments: list, n_words: int, *, eager: bool = False) -> list:
    """Merge trailing segments (geometric policy; ``eager``: merge every mergeable neighbour pair)."""
    segments = list(segments)
    if eager:
        out = []
        for s in segments:
            if out and _mergeable(out[-1], s, eager=True):
                out[-1] = merge_segments(out[-1], s, n_words)
            else:
                out.append(s)
        return out
    while len(segments) >= 2 and _mergeable(segments[-2], segments[-1], eager=False):
        b = segments.pop()
        segments[-1] = merge_segments(segments[-1], b, n_words)
    return segments


def _split_ranges(image_start: int, n_images: int, images: np.ndarray):
    """Cut ``[image_start, image_start + n_images)`` into ranges of at most MAX_SEGMENT_IMAGES images and
    MAX_SEGMENT_ENTRIES postings (``images`` ascending): ``[(start, stop, row start, row stop)]``."""
    out = []
    s, r = image_start, 0
    stop_all = image_start + n_images
    while s < stop_all:
        e = min(s + MAX_SEGMENT_IMAGES, stop_all)
        re = int(np.searchsorted(images, e, side="left"))
        if re - r > MAX_SEGMENT_ENTRIES:  # too many postings: cut at the image holding the limit
            e = max(s + 1, int(images[r + MAX_SEGMENT_ENTRIES]))
            re = int(np.searchsorted(images, e, side="left"))
        out.append((s, e, r, re))
        s, r = e, re
    return out


def from_postings(centroids, vecs, words, images, *, idf, norm_factor, n_images: int, imid_offset: int,
                  binary: bool, use_idf: bool, codebook_size_param=None, order=None) -> Index:
    """An :class:`Index` from word-major sorted postings (host arrays).

    Args:
        centroids: ``[K, D] float32``.
        vecs: ``[E, W]`` posting vectors; words, images: ``[E] int`` (words non-decreasing, images ascending
            within a word).
        idf: ``[K]`` word weights; norm_factor: ``[n_images]`` image normalizations.
        order: optional ``[E]`` permutation: the postings are ``vecs[order]``, ``words[order]``, ``images[order]``.
    """
    centroids = np.asarray(centroids, np.float32)
    k, d = centroids.shape
    width = packed_width(d) if binary else d
    dtype = np.uint32 if binary else np.float32
    vecs = np.asarray(vecs, dtype).reshape(-1, width)
    words = np.asarray(words, np.int32)
    images = np.asarray(images, np.int64)
    if order is not None:
        vecs, words, images = vecs[order], words[order], images[order]
    norm_factor = np.asarray(norm_factor, np.float32)
    by_image = np.argsort(images, kind="stable")  # image-major; word-major again inside each segment
    segments = []
    for s, e, r0, r1 in _split_ranges(0, int(n_images), images[by_image]):
        rows = by_image[r0:r1]
        rows = rows[_word_sort(words[rows], k)]
        segments.append(make_segment(vecs[rows], words[rows], images[rows], image_start=s, n_images=e - s,
                                     norm_factor=norm_factor[s:e], n_words=k))
    counts = np.bincount(words, minlength=k).astype(np.int32) if words.size else np.zeros(k, np.int32)
    return Index(centroids=centroids, counts=counts, idf=np.asarray(idf, np.float32), segments=tuple(segments),
                 image_slots=_scalar(n_images), imid_offset=int(imid_offset), binary=bool(binary),
                 use_idf=bool(use_idf), dim=int(d),
                 codebook_size_param=k if codebook_size_param is None else codebook_size_param)


def empty(centroids, *, binary: bool, use_idf: bool, codebook_size_param=None, dense_ids: bool = False) -> Index:
    """An index with no entries over the codebook ``centroids`` (``[K, D] float32``); ``dense_ids``: asmk's layout
    (see :class:`Index`)."""
    k, d = np.shape(centroids)
    width = packed_width(d) if binary else d
    index = from_postings(centroids, np.zeros((0, width)), np.zeros(0, np.int32), np.zeros(0, np.int32),
                          idf=np.ones(k, np.float32), norm_factor=np.zeros(0, np.float32), n_images=0,
                          imid_offset=0, binary=binary, use_idf=use_idf, codebook_size_param=codebook_size_param)
    return dataclasses.replace(index, dense_ids=bool(dense_ids))


def extend_names(index, names, n_new: int):
    """The :class:`ImageNames` of ``index`` (an :class:`Index` or a sharded index) after an add of ``n_new``
    images named ``names`` (None: unnamed), checked: a named index takes names for every add, an index of
    unnamed images takes none, and each name is new.

    Raises:
        ValueError: naming what is wrong.
    """
    have = index.names
    if names is None:
        if have is not None:
            raise ValueError(f"this index names its images: give names= for the {n_new} new images (one per "
                             "image, in ascending id order)")
        return None
    if index.dense_ids:
        raise ValueError("image names need jasmk's compact ids; an index in asmk's dense layout (jasmk.compat) "
                         "keeps none")
    names = list(names) if not isinstance(names, (str, bytes)) else names
    if isinstance(names, (str, bytes)) or len(names) != n_new:
        got = "a single string" if isinstance(names, (str, bytes)) else f"{len(names)} names"
        raise ValueError(f"{got} for {n_new} new images: give one name per image, in ascending id order")
    if have is None:
        if int(index.n_images) > 0:
            raise ValueError(f"this index holds {int(index.n_images)} images without names: names cannot start "
                             "in the middle (build the index with names= from the start)")
        return ImageNames.from_list(names)
    return have.extended(names)


def add(index: Index, agg: Aggregated, *, names=None) -> Index:
    """Return ``index`` with the aggregated images ``agg`` appended (asmk's ``IVF.add``), in amortized
    O(rows added) (O(index) with idf on, whose normalization changes everywhere).

    Image ids are names: the new images take the next internal slots whatever their ids, so gaps between ids
    cost nothing (except with ``dense_ids``, asmk's layout). Their names (ids plus ``index.imid_offset``) must be
    larger than every name already there: images are added in ascending id order and never twice. ``agg`` rows
    must be grouped by image in ascending order (their order within an image does not matter). ``names``: one
    name per new image, in ascending id order, for an index that names its images (see :func:`extend_names`).
    """
    width = index.width
    if agg.vecs.ndim != 2 or agg.vecs.shape[1] != width:
        raise ValueError(f"aggregated vectors have shape {agg.vecs.shape}, the index holds width {width}")
    if agg.words.shape[0] == 0:
        raise ValueError("nothing to add: no aggregated entries")
    old_n = int(index.n_images)
    images, n_images, id_map = assign_slots(index, agg)
    image_names = extend_names(index, names, n_images - old_n)
    k = index.n_words
    new_words = np.asarray(agg.words, np.int32)
    new_vecs = np.asarray(agg.vecs)
    touched, added = np.unique(new_words, return_counts=True)  # O(rows): a small add does not pass over all K
    counts = np.array(index.counts, np.int32)
    if int(counts[touched].max()) + int(added.max()) >= 2**31 - 1:
        raise ValueError("a word would hold more than 2**31 - 2 postings")
    counts[touched] += added.astype(np.int32)
    idf = np.asarray(index.idf, np.float32)
    if index.use_idf:
        idf = idf.copy()
        idf[touched] = np.log(n_images / counts[touched].astype(np.int64)) ** 2
    segments = list(index.segments)
    if index.use_idf:  # every image's normalization moves with the refreshed idf (asmk recomputes it all)
        segments = [renormalized(s, idf) for s in segments]
    norm_new = np.bincount(images - old_n, weights=idf[new_words], minlength=n_images - old_n)
    if index.reservation is not None:
        segments = _add_reserved(segments, index.reservation, new_vecs, new_words, images, old_n, n_images,
                                 norm_new, k)
    for s, e, r0, r1 in ([] if index.reservation is not None else _split_ranges(old_n, n_images - old_n, images)):
        segments.append(make_segment(new_vecs[r0:r1], new_words[r0:r1], images[r0:r1], image_start=s,
                                     n_images=e - s, norm_factor=norm_new[s - old_n:e - old_n], n_words=k))
        segments = _compact(segments, k)
    log.debug("ivf add: %d rows, %d images, %d segments", new_words.shape[0], n_images, len(segments))
    return dataclasses.replace(index, counts=counts, idf=idf, segments=tuple(segments),
                               image_slots=_scalar(n_images), ids=id_map, names=image_names)


def add_bytes(agg: Aggregated) -> int:
    """Host bytes an add of ``agg`` allocates for its new segment (postings copied once, plus sort indices)."""
    rows = int(agg.words.shape[0])
    return rows * (int(np.asarray(agg.vecs).itemsize) * int(agg.vecs.shape[1]) + 4 + 4 + 8)


def renormalized(seg: Segment, idf: np.ndarray) -> Segment:
    """``seg`` with ``norm_factor`` recomputed from ``idf`` (float64 sums, as a fresh build makes them)."""
    h = host(seg)
    e = int(h.offsets[-1])
    norm = np.zeros(h.norm_factor.shape[0], np.float32)
    norm[: h.n_images] = np.bincount(h.images[:e], weights=idf[h.words[:e]], minlength=h.n_images)[: h.n_images]
    return _segment_from(h.vecs, h.words, h.images, h.offsets, norm, h.image_start, h.n_images)


def compact(index: Index) -> Index:
    """``index`` with neighbouring segments merged as far as the per-segment limits allow (fewer, larger
    segments: fewer scorer calls per query batch). Scores do not change."""
    return dataclasses.replace(index, segments=tuple(_compact(index.segments, index.n_words, eager=True)))


def with_distractors(index: Index) -> Index:
    """Use ``index`` as a distractor set: later adds are numbered after its images (asmk's ``imid_offset``: the
    largest name + 1), and their ids are reported as given; the distractors' ids become negative."""
    return dataclasses.replace(index, imid_offset=int(index.next_name))


def from_segments(centroids, counts, idf, segments, *, n_images: int, imid_offset: int, binary: bool,
                  use_idf: bool, dim: int, codebook_size_param=None, ids: IdMap | None = None,
                  dense_ids: bool = False, names: ImageNames | None = None) -> Index:
    """An :class:`Index` of already built segments (tiling ``[0, n_images)`` in order) and its per-word arrays."""
    return Index(centroids=centroids, counts=counts, idf=idf, segments=tuple(segments), image_slots=_scalar(n_images),
                 imid_offset=int(imid_offset), binary=bool(binary), use_idf=bool(use_idf), dim=int(dim),
                 codebook_size_param=codebook_size_param, ids=ids, dense_ids=bool(dense_ids), names=names)


__all__ = ["ENTRY_BLOCK", "HostSegment", "IdMap", "Index", "MAX_NAME", "MAX_SEGMENT_ENTRIES", "MAX_SEGMENT_IMAGES",
           "MERGE_RATIO", "Reservation", "Segment", "add", "add_bytes", "assign_slots", "capacity", "compact", "empty",
           "entries", "extend_names", "from_postings", "from_segments", "host", "inverse_sqrt", "make_segment",
           "merge_segments", "on_device", "public_ids", "renormalized", "reserve", "with_distractors"]
