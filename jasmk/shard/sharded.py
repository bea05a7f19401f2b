"""A sharded inverted file: the images split over one axis of a :class:`jax.sharding.Mesh`.

A :class:`ShardedIndex` holds ``S`` shards (``S`` = the size of the mesh axis ``axis``). Shard ``s`` owns a set of
internal image ids (a union of contiguous id ranges, ascending) and stores their postings as one word-major
segment, exactly as a :class:`jasmk.ivf.Segment` does, with *local* image ids ``0..n_s-1`` (local order = global
order). The per-shard arrays are stacked on a leading shard axis, padded to a common capacity (the largest
shard's, on :func:`jasmk.ivf.capacity`'s ladder) and sharded over ``axis`` with a ``NamedSharding``; per-shard
sizes (images, postings) and the local-to-global id map are data. The codebook, the word counts and idf are
replicated.

Queries are replicated to every shard; each shard scores its images with the XLA kernels of
:mod:`jasmk.score` (dense scan, or sparse with a static pair bound) under :func:`jax.shard_map`, keeps its
top-k, and the ``S x k`` candidates are merged by (score descending, global image id ascending): the order of
the single-device index. Scores are bit-identical to the single-device index (all kernels sum the same float32
terms in fixed point). The numba CPU kernel (``kernel="sparse-cpu"``) is host code and cannot run inside
``shard_map``; ``auto`` chooses between the two XLA kernels with :mod:`jasmk.core.engine`'s cost model, once per
batch for all shards (the shards run one program), using the largest shard's touched-pair count.
``score_matrix`` gathers each shard's ``[B, I]`` block and places it by columns.

Building and adding split the new image slots into contiguous id ranges by posting count (filling the shards
with the fewest postings first), so shards stay balanced in postings, not in images. Each shard's rows are
built on the host of the process that owns the shard and transferred to that shard's device only
(``jax.make_array_from_callback``); no device holds more than its own shard. Word counts are a cross-shard sum
(``psum`` over the mesh axis of each shard's added counts) on every add, and idf follows asmk's rule (refreshed
for the words an add touches, ``log(n_images / counts)**2``), so ``use_idf`` results equal one device's.

Limits and costs:

* A shard holds at most :data:`MAX_SHARD_ENTRIES` (``2**30``) postings: the kernels use int32 posting positions
  and offsets. Past it, use a larger mesh axis (or int64 positions, which would need ``jax_enable_x64`` and
  changes to :mod:`jasmk.score`).
* A shard is one segment: an add merges the new rows into each receiving shard's segment, O(that shard's
  postings) on the host (the single-device index amortizes this with geometric segment merges), and re-sends the
  changed shards. With idf on every image's normalization changes anyway (as on one device).
* The per-device accumulator is ``I x B x 16`` bytes (``I`` the largest shard's image capacity); the batch size
  shrinks to keep it within :data:`jasmk.score.ACC_BYTES`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .. import api
from ..core import engine as engine_mod
from ..core import ivf as ivf_mod
from ..core import memory
from ..core import score as score_mod
from ..core.aggregate import PAD_IMAGE, Aggregated, packed_width
from ..core.codebook import Codebook
from ..storage import checkpoint, shard_format

log = logging.getLogger(__name__)


def _shard_map(fn, *, mesh, in_specs, out_specs):
    """``jax.shard_map`` without replication checks (newer jax), or ``jax.experimental.shard_map`` (jax < 0.6)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)

MAX_SHARD_ENTRIES = ivf_mod.MAX_SEGMENT_ENTRIES  # postings per shard: int32 positions with room to spare
KERNELS = ("auto", "dense", "sparse", "sparse-xla")  # the XLA kernels: the numba one cannot run in shard_map
ENGINES = KERNELS  # the 0.1 name

_DATA = ["centroids", "counts", "idf", "vecs", "words", "images", "offsets", "norm_factor", "scale", "gids",
         "shard_images", "image_slots"]
_META = ["mesh", "axis", "imid_offset", "binary", "use_idf", "dim", "codebook_size_param", "ids", "dense_ids",
         "names"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=_DATA, meta_fields=_META)
@dataclasses.dataclass(frozen=True)
class ShardedIndex:
    """An ASMK inverted file split by images over the mesh axis ``axis`` (``S`` shards).

    Attributes:
        centroids: ``[K, D] float32`` codebook (replicated).
        counts: ``[K] int32`` postings per word over all shards (replicated).
        idf: ``[K] float32`` word weights (replicated).
        vecs: ``[S, C, W] uint32`` (binary) or ``[S, C, D] float32`` postings of each shard, word-major
            (sharded over ``axis``; rows past a shard's postings are zero).
        words: ``[S, C] int32`` word of each posting (padding 0).
        images: ``[S, C] int32`` local image slot of each posting (padding ``PAD_IMAGE``).
        offsets: ``[S, K + 1] int32`` start of each word's postings in each shard.
        norm_factor: ``[S, I] float32`` normalization of each local image slot (0 for padding slots).
        scale: ``[S, I] float32`` ``1 / sqrt(norm_factor)`` (0 where the norm is 0).
        gids: ``[S, I] int32`` internal (global) id of each local slot (``PAD_IMAGE`` for padding slots).
        shard_images: ``[S] int32`` image slots of each shard.
        image_slots: ``[] int32`` global image slots (largest internal id + 1, replicated).
        mesh, axis: the mesh and the name of the axis the shards lie along.
        imid_offset, binary, use_idf, dim, codebook_size_param, ids, dense_ids, names: as in
            :class:`jasmk.ivf.Index` (``gids`` are internal slots; ``ids`` names them).
    """

    centroids: jax.Array
    counts: jax.Array
    idf: jax.Array
    vecs: jax.Array
    words: jax.Array
    images: jax.Array
    offsets: jax.Array
    norm_factor: jax.Array
    scale: jax.Array
    gids: jax.Array
    shard_images: jax.Array
    image_slots: jax.Array
    mesh: object
    axis: str
    imid_offset: int
    binary: bool
    use_idf: bool
    dim: int
    codebook_size_param: object = None
    ids: "ivf_mod.IdMap | None" = None
    dense_ids: bool = False
    names: object = None
    #: the host bookkeeping (shard ranges, per-shard offsets and segments) and the host centroids: neither a PyTree
    #: leaf nor static metadata; a PyTree transform starts without them (see :func:`_host_info`)
    caches: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        kind = "ASMK*" if self.binary else "ASMK"
        try:
            sizes = f"images={self.n_images}, postings={self.n_entries}"
        except ValueError:  # rebuilt by a PyTree transform: no host bookkeeping
            sizes = "no host bookkeeping"
        return (f"ShardedIndex({kind}, {sizes}, words={self.n_words}, dim={self.dim}, shards={self.n_shards} on "
                f"axis {self.axis!r}, use_idf={self.use_idf}, imid_offset={self.imid_offset})")

    @property
    def n_shards(self) -> int:
        return int(self.mesh.shape[self.axis])

    @property
    def n_words(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def n_images(self) -> int:
        return int(_host_info(self).n_images)

    @property
    def width(self) -> int:
        return packed_width(self.dim) if self.binary else int(self.dim)

    @property
    def next_name(self) -> int:
        """As :attr:`jasmk.ivf.Index.next_name`."""
        return int(self.ids.names[-1]) + 1 if self.ids is not None else self.n_images

    @property
    def image_ids(self) -> np.ndarray:
        """``[n_images] int64`` id of each internal slot (as :attr:`jasmk.ivf.Index.image_ids`)."""
        return ivf_mod.public_ids(self, np.arange(self.n_images, dtype=np.int64))

    @property
    def shard_entries(self) -> np.ndarray:
        """``[S] int64`` postings of each shard (host)."""
        return _host_info(self).offsets[:, -1].copy()

    @property
    def n_entries(self) -> int:
        return int(_host_info(self).offsets[:, -1].sum())

    @property
    def shard_ranges(self) -> list:
        """Per shard, the internal id ranges ``[(start, stop), ...]`` it owns (ascending)."""
        return [list(r) for r in _host_info(self).ranges]

    def device_bytes(self) -> dict:
        """Bytes of this index's arrays on each device: ``{device: bytes}``."""
        out = {}
        for leaf in jax.tree_util.tree_leaves(self):
            for sh in leaf.addressable_shards:
                out[sh.device] = out.get(sh.device, 0) + sh.data.nbytes
        return out


@dataclasses.dataclass
class _Host:
    """Host-side facts of a sharded index (replicated in every process) and the host segments of the shards
    this process owns. Kept on the index object; never traced."""

    n_images: int
    ranges: list  # per shard: [(start, stop), ...] internal ids
    offsets: np.ndarray  # [S, K + 1] int64
    counts: np.ndarray  # [K] int64
    idf: np.ndarray  # [K] float32
    segments: dict  # shard -> ivf.Segment (local shards only), local image ids


def _host_info(sidx: ShardedIndex) -> _Host:
    h = sidx.caches.get("host")
    if h is None:
        raise ValueError("this ShardedIndex has lost its host bookkeeping (it was rebuilt by a PyTree transform); "
                         "use the index returned by jasmk.shard functions")
    return h


# ---------------------------------------------------------------------------------------------------------
# mesh helpers


def _check_mesh(mesh, axis):
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis is None:
        axis = mesh.axis_names[0]
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh (axes {mesh.axis_names})")
    return mesh, axis


def local_shards(mesh, axis) -> list:
    """Shard numbers whose device (one of them, on other mesh axes) belongs to this process."""
    n = int(mesh.shape[axis])
    sharding = NamedSharding(mesh, P(axis))
    return sorted({(idx[0].start or 0) for idx in sharding.addressable_devices_indices_map((n,)).values()})


def _sharded(mesh, axis, shape, dtype, fn):
    """A ``shape`` array sharded over ``axis`` on dim 0 whose shard ``s`` is ``fn(s)`` (built only for the
    shards this process holds)."""

    def cb(idx):
        s = idx[0].start or 0
        return np.asarray(fn(s), dtype)[None].copy()

    return jax.make_array_from_callback(tuple(shape), NamedSharding(mesh, P(axis)), cb)


def _replicated(mesh, x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


def _to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-process) array on the host."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _replica(x) -> np.ndarray:
    """A replicated array's value (this process's copy)."""
    return np.asarray(x.addressable_data(0))


@functools.partial(jax.jit, static_argnames=("mesh", "axis"))
def _cross_shard_sum(per_shard, *, mesh, axis):
    """``[K]`` sum over the shards of ``per_shard`` (``[S, K]``, sharded): a ``psum`` over the mesh axis."""
    return _shard_map(lambda c: jax.lax.psum(c[0], axis), mesh=mesh, in_specs=P(axis), out_specs=P())(per_shard)


# ---------------------------------------------------------------------------------------------------------
# construction


def _balanced_cuts(loads: np.ndarray, per_slot: np.ndarray) -> np.ndarray:
    """``[S + 1]`` cut points splitting ``len(per_slot)`` new image slots (postings ``per_slot``) into ``S``
    contiguous pieces, shard ``s`` getting slots ``[cuts[s], cuts[s + 1])``: each shard gets about the postings
    it lacks to reach the mean (``loads`` its postings now)."""
    s = loads.shape[0]
    n = per_slot.shape[0]
    new = float(per_slot.sum())
    target = (float(loads.sum()) + new) / s
    deficit = np.maximum(target - loads.astype(np.float64), 0.0)
    if deficit.sum() <= 0:
        deficit = np.ones(s)
    quota = np.cumsum(deficit / deficit.sum() * new)
    cum = np.cumsum(per_slot, dtype=np.float64)
    mid = cum - per_slot / 2.0  # a slot goes where its middle posting falls
    cuts = np.searchsorted(mid, quota[:-1], side="left")
    cuts = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    if new == 0:  # only empty slots: spread them evenly
        cuts = np.linspace(0, n, s + 1).round().astype(np.int64)
    return np.maximum.accumulate(cuts)


def _empty_host(k: int, s: int, idf: np.ndarray) -> _Host:
    return _Host(n_images=0, ranges=[[] for _ in range(s)], offsets=np.zeros((s, k + 1), np.int64),
                 counts=np.zeros(k, np.int64), idf=np.asarray(idf, np.float32), segments={})


def _empty_segment(width: int, binary: bool, k: int) -> ivf_mod.Segment:
    dtype = np.uint32 if binary else np.float32
    return ivf_mod.make_segment(np.zeros((0, width), dtype), np.zeros(0, np.int32), np.zeros(0, np.int64),
                                image_start=0, n_images=0, norm_factor=np.zeros(0, np.float32), n_words=k)


def _gids(ranges, i_cap: int) -> np.ndarray:
    out = np.full(i_cap, PAD_IMAGE, np.int32)
    ids = np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros(0, np.int64)
    out[: ids.size] = ids
    return out


def _assemble(h: _Host, *, centroids, mesh, axis, imid_offset, binary, use_idf, dim, size_param, ids=None,
              dense_ids=False, names=None) -> ShardedIndex:
    """A :class:`ShardedIndex` over the host bookkeeping ``h``: each local shard's segment padded to the common
    capacities and sent to its device(s) only."""
    s = int(mesh.shape[axis])
    k = centroids.shape[0]
    width = packed_width(dim) if binary else dim
    entries = h.offsets[:, -1]
    shard_n = np.array([sum(b - a for a, b in r) for r in h.ranges], np.int64)
    too_big = np.flatnonzero(entries > MAX_SHARD_ENTRIES)
    if too_big.size:
        raise ValueError(f"shard {int(too_big[0])} would hold {int(entries[too_big[0]])} postings, more than the "
                         f"{MAX_SHARD_ENTRIES} a shard holds (int32 positions); use a mesh axis with more devices")
    c = max(ivf_mod.capacity(int(e), multiple=ivf_mod.ENTRY_BLOCK) for e in entries)
    i_cap = max(ivf_mod.capacity(int(n), minimum=64) for n in shard_n)
    vdtype = np.uint32 if binary else np.float32

    def seg(si):
        return ivf_mod.host(h.segments[si])

    def pad(a, n, fill):
        out = np.full((n,) + a.shape[1:], fill, a.dtype)
        m = min(a.shape[0], n)
        out[:m] = a[:m]
        return out

    arrays = dict(
        vecs=_sharded(mesh, axis, (s, c, width), vdtype, lambda si: pad(seg(si).vecs, c, 0)),
        words=_sharded(mesh, axis, (s, c), np.int32, lambda si: pad(seg(si).words, c, 0)),
        images=_sharded(mesh, axis, (s, c), np.int32, lambda si: pad(seg(si).images, c, PAD_IMAGE)),
        offsets=_sharded(mesh, axis, (s, k + 1), np.int32, lambda si: h.offsets[si]),
        norm_factor=_sharded(mesh, axis, (s, i_cap), np.float32, lambda si: pad(seg(si).norm_factor, i_cap, 0)),
        scale=_sharded(mesh, axis, (s, i_cap), np.float32, lambda si: pad(seg(si).scale, i_cap, 0)),
        gids=_sharded(mesh, axis, (s, i_cap), np.int32, lambda si: _gids(h.ranges[si], i_cap)),
        shard_images=_sharded(mesh, axis, (s,), np.int32, lambda si: np.asarray(shard_n[si])),
    )
    out = ShardedIndex(centroids=_replicated(mesh, np.asarray(centroids, np.float32)),
                       counts=_replicated(mesh, h.counts.astype(np.int32)),
                       idf=_replicated(mesh, h.idf), image_slots=_replicated(mesh, np.int32(h.n_images)),
                       mesh=mesh, axis=axis, imid_offset=int(imid_offset), binary=bool(binary),
                       use_idf=bool(use_idf), dim=int(dim), codebook_size_param=size_param, ids=ids,
                       dense_ids=bool(dense_ids), names=names, **arrays)
    out.caches["host"] = h
    out.caches["centroids"] = np.asarray(centroids, np.float32)
    log.debug("sharded index: %d images, postings per shard %s, capacity %d x %d", h.n_images, entries.tolist(),
              c, i_cap)
    return out


def _fields(sidx: ShardedIndex) -> dict:
    return dict(centroids=sidx.caches["centroids"], mesh=sidx.mesh, axis=sidx.axis,
                imid_offset=sidx.imid_offset, binary=sidx.binary, use_idf=sidx.use_idf, dim=sidx.dim,
                size_param=sidx.codebook_size_param, ids=sidx.ids, dense_ids=sidx.dense_ids, names=sidx.names)


def empty(centroids, *, mesh, axis=None, binary: bool, use_idf: bool, codebook_size_param=None) -> ShardedIndex:
    """A sharded index with no images over the codebook ``centroids`` (``[K, D] float32``)."""
    mesh, axis = _check_mesh(mesh, axis)
    centroids = np.asarray(centroids, np.float32)
    k, d = centroids.shape
    s = int(mesh.shape[axis])
    h = _empty_host(k, s, np.ones(k, np.float32))
    width = packed_width(d) if binary else d
    h.segments = {si: _empty_segment(width, binary, k) for si in local_shards(mesh, axis)}
    return _assemble(h, centroids=centroids, mesh=mesh, axis=axis, imid_offset=0, binary=binary, use_idf=use_idf,
                     dim=d, size_param=k if codebook_size_param is None else codebook_size_param)


def add(sidx: ShardedIndex, agg: Aggregated, *, names=None) -> ShardedIndex:
    """Return ``sidx`` with the aggregated images ``agg`` appended (the semantics of :func:`jasmk.ivf.add`).

    The new image slots are split into contiguous id ranges by posting count over the shards (the emptiest
    shards get the most); each process builds and sends only its own shards. Word counts are summed across
    shards (``psum``) and idf is refreshed for the touched words with the global image count.
    """
    h = _host_info(sidx)
    width, k, s = sidx.width, sidx.n_words, sidx.n_shards
    if agg.vecs.ndim != 2 or agg.vecs.shape[1] != width:
        raise ValueError(f"aggregated vectors have shape {agg.vecs.shape}, the index holds width {width}")
    if agg.words.shape[0] == 0:
        raise ValueError("nothing to add: no aggregated entries")
    old_n = h.n_images
    images, n_images, id_map = ivf_mod.assign_slots(sidx, agg)
    image_names = ivf_mod.extend_names(sidx, names, n_images - old_n)
    new_words = np.asarray(agg.words, np.int32)
    new_vecs = np.asarray(agg.vecs)
    per_slot = np.bincount(images - old_n, minlength=n_images - old_n)
    cuts = _balanced_cuts(h.offsets[:, -1], per_slot) + old_n  # shard si gets [cuts[si], cuts[si + 1])
    rows = np.searchsorted(images, cuts, side="left")
    added_by_shard = {si: np.bincount(new_words[rows[si]:rows[si + 1]], minlength=k) for si in range(s)}
    # cross-shard sum of the counts each shard adds (each process supplies its own shards)
    per_shard = _sharded(sidx.mesh, sidx.axis, (s, k), np.int32, lambda si: added_by_shard[si])
    added = _replica(_cross_shard_sum(per_shard, mesh=sidx.mesh, axis=sidx.axis)).astype(np.int64)
    counts = h.counts + added
    idf = h.idf.copy()
    if sidx.use_idf:
        touched = np.flatnonzero(added)
        idf[touched] = np.log(n_images / counts[touched]) ** 2
    norm_new = np.bincount(images - old_n, weights=idf[new_words], minlength=n_images - old_n)
    offsets = h.offsets.copy()
    ranges = [list(r) for r in h.ranges]
    segments = dict(h.segments)
    for si in range(s):
        a, b = int(cuts[si]), int(cuts[si + 1])
        r0, r1 = int(rows[si]), int(rows[si + 1])
        n_old = sum(y - x for x, y in ranges[si])
        offsets[si, 1:] += np.cumsum(added_by_shard[si])
        if si in segments:
            seg = segments[si]
            if sidx.use_idf and n_old:
                seg = ivf_mod.renormalized(seg, idf)
            if b > a:
                new = ivf_mod.make_segment(new_vecs[r0:r1], new_words[r0:r1], images[r0:r1] - a + n_old,
                                           image_start=n_old, n_images=b - a,
                                           norm_factor=norm_new[a - old_n:b - old_n], n_words=k)
                seg = ivf_mod.merge_segments(seg, new, k) if n_old else new
            segments[si] = seg
        if b > a:
            if ranges[si] and ranges[si][-1][1] == a:
                ranges[si][-1] = (ranges[si][-1][0], b)
            else:
                ranges[si].append((a, b))
    new_h = _Host(n_images=n_images, ranges=ranges, offsets=offsets, counts=counts, idf=idf, segments=segments)
    log.debug("sharded add: %d rows, %d images, cuts %s", new_words.shape[0], n_images, cuts.tolist())
    return _assemble(new_h, **{**_fields(sidx), "ids": id_map, "names": image_names})


def _from_postings(centroids, vecs, words, images, *, norm_factor, idf, counts, n_images: int, mesh, axis,
                   imid_offset, binary, use_idf, size_param, ids=None, dense_ids=False, names=None) -> ShardedIndex:
    """A sharded index over global postings (host arrays; any order), split by posting count into ``S``
    contiguous image ranges, keeping the given normalization and idf."""
    centroids = np.asarray(centroids, np.float32)
    k, d = centroids.shape
    s = int(mesh.shape[axis])
    words = np.asarray(words, np.int32)
    images = np.asarray(images, np.int64)
    order = np.lexsort((images, words))  # word-major, ascending images within a word
    per_slot = np.bincount(images, minlength=n_images) if images.size else np.zeros(n_images, np.int64)
    cuts = _balanced_cuts(np.zeros(s, np.int64), per_slot)
    h = _empty_host(k, s, idf)
    h.n_images, h.counts = int(n_images), np.asarray(counts, np.int64)
    width = packed_width(d) if binary else d
    mine = set(local_shards(mesh, axis))
    shard_of_row = np.searchsorted(cuts, images[order], side="right") - 1
    for si in range(s):
        a, b = int(cuts[si]), int(cuts[si + 1])
        sel = order[shard_of_row == si]
        h.offsets[si, 1:] = np.cumsum(np.bincount(words[sel], minlength=k))
        if b > a:
            h.ranges[si].append((a, b))
        if si in mine:
            if b > a:
                h.segments[si] = ivf_mod.make_segment(np.asarray(vecs)[sel], words[sel], images[sel] - a,
                                                      image_start=0, n_images=b - a,
                                                      norm_factor=np.asarray(norm_factor)[a:b], n_words=k)
            else:
                h.segments[si] = _empty_segment(width, binary, k)
    return _assemble(h, centroids=centroids, mesh=mesh, axis=axis, imid_offset=imid_offset, binary=binary,
                     use_idf=use_idf, dim=d, size_param=size_param, ids=ids, dense_ids=dense_ids, names=names)


def shard_index(index: ivf_mod.Index, mesh, *, axis=None) -> ShardedIndex:
    """Split a single-device :class:`~jasmk.ivf.Index` over the mesh axis ``axis`` (default: the first), by
    posting count, keeping its idf and normalization (so scores are bit-identical)."""
    mesh, axis = _check_mesh(mesh, axis)
    vecs, words, images = ivf_mod.entries(index)
    return _from_postings(index.centroids, vecs, words, images, norm_factor=index.norm_factor,
                          idf=np.asarray(index.idf, np.float32), counts=np.asarray(index.counts),
                          n_images=index.n_images, mesh=mesh, axis=axis, imid_offset=index.imid_offset,
                          binary=index.binary, use_idf=index.use_idf, size_param=index.codebook_size_param,
                          ids=index.ids, dense_ids=index.dense_ids, names=index.names)


def with_distractors(sidx: ShardedIndex) -> ShardedIndex:
    """Use ``sidx`` as a distractor set: later adds are numbered after its images (asmk's ``imid_offset``)."""
    out = dataclasses.replace(sidx, imid_offset=int(sidx.next_name))
    out.caches.update(sidx.caches)
    return out


def _codebook(sidx: ShardedIndex) -> Codebook:
    return Codebook(sidx.caches["centroids"], sidx.codebook_size_param)


def build_sharded(feats, ids, *, codebook, mesh, axis=None, binary: bool = True, use_idf: bool = False,
                  multiple_assignment: int = 1, quantizer: str = "faiss", distractors=None,
                  word_ids=None, names=None) -> ShardedIndex:
    """:func:`jasmk.build_index` onto the mesh axis ``axis`` (default: the mesh's first axis).

    ``distractors``: a :class:`ShardedIndex` on the same mesh (or a single-device index, sharded first) whose
    images stay before the new ones. Other arguments as :func:`jasmk.build_index`.
    """
    cb = api.as_codebook(codebook)
    mesh, axis = _check_mesh(mesh, axis)
    if distractors is not None:
        if isinstance(distractors, ivf_mod.Index):
            distractors = shard_index(distractors, mesh, axis=axis)
        if not isinstance(distractors, ShardedIndex):
            raise ValueError(f"distractors must be a ShardedIndex or an Index, got {type(distractors).__name__}")
        if distractors.dim != cb.dim or distractors.n_words != cb.size:
            raise ValueError("the distractor index was built with a different codebook")
        if distractors.binary != bool(binary) or distractors.use_idf != bool(use_idf):
            raise ValueError("the distractor index has different binary/use_idf settings")
        if distractors.mesh != mesh or distractors.axis != axis:
            raise ValueError("the distractor index lies on another mesh or axis; load or shard it onto this one")
        sidx = with_distractors(distractors)
    else:
        sidx = empty(cb.centroids, mesh=mesh, axis=axis, binary=binary, use_idf=use_idf,
                     codebook_size_param=cb.size_param)
    return add_images(sidx, feats, ids, multiple_assignment=multiple_assignment, quantizer=quantizer,
                      word_ids=word_ids, names=names)


def add_images(sidx: ShardedIndex, feats, ids, *, multiple_assignment: int = 1, quantizer: str = "faiss",
               word_ids=None, names=None) -> ShardedIndex:
    """:func:`jasmk.add_images` for a sharded index."""
    agg = api.aggregate_images(_codebook(sidx), feats, ids, binary=sidx.binary,
                               multiple_assignment=multiple_assignment, quantizer=quantizer, word_ids=word_ids,
                               sort=False)
    return add(sidx, agg, names=names)


# ---------------------------------------------------------------------------------------------------------
# scoring


def _layout(sidx: ShardedIndex) -> dict:
    """What :func:`jasmk.core.engine.batches` needs (batch size from the largest shard's slots)."""
    return {"n_words": sidx.n_words, "width": sidx.width, "idf": _host_info(sidx).idf,
            "image_capacity": int(sidx.norm_factor.shape[1])}


def _kernel(sidx: ShardedIndex, batch, kernel: str):
    """``(kind, pairs_cap)`` for a batch: one XLA kernel for every shard, from the largest touched-pair count."""
    h = _host_info(sidx)
    words = batch.words[: batch.n_rows]
    pairs = int((h.offsets[:, words + 1] - h.offsets[:, words]).sum(axis=1).max())
    kind = engine_mod.choose_kernel(kernel="sparse-xla" if kernel == "sparse" else kernel,
                                    capacity=int(sidx.vecs.shape[1]), n_queries=batch.n_queries,
                                    max_rows=batch.max_rows, pairs=pairs, binary=False, width=sidx.width)
    if kind == "sparse-xla":
        cap = engine_mod.pairs_capacity(pairs)
        memory.require(3 * cap * (sidx.width + 4) * 4, f"the sparse kernel's {pairs} pairs per shard",
                       hint="use kernel='dense' or 'auto', or fewer query images per call",
                       device=engine_mod.backend() != "cpu")
        return kind, cap
    return "dense", 0


def _shard_scores(kind, n_queries, pairs_cap, vecs, words, images, offsets, norm, scale, n_img, idf, qv, qw, qs,
                  qscale, alpha, thr):
    """``[B, I]`` scores of one shard (inside ``shard_map``: leading shard axis of size 1)."""
    seg = ivf_mod.Segment(vecs=vecs[0], words=words[0], images=images[0], offsets=offsets[0],
                          norm_factor=norm[0], scale=scale[0], image_start=jnp.int32(0), n_images=n_img[0])
    args = (seg, idf, qv, qw, qs, qscale, alpha, thr)
    if kind == "dense":
        return score_mod.dense_segment(*args, n_queries=n_queries)
    return score_mod.sparse_segment(*args, n_queries=n_queries, pairs_cap=pairs_cap)


def _shard_args(sidx: ShardedIndex):
    return (sidx.vecs, sidx.words, sidx.images, sidx.offsets, sidx.norm_factor, sidx.scale, sidx.shard_images)


@functools.partial(jax.jit, static_argnames=("n_queries", "k", "kind", "pairs_cap"))
def _ranked(sidx: ShardedIndex, qv, qw, qs, qscale, alpha, thr, *, n_queries: int, k: int, kind: str,
            pairs_cap: int):
    """``(ids [B, S * k] int32, scores [B, S * k])``: every shard's best ``k`` merged by (score desc, id asc)."""
    ax = sidx.axis

    def per_shard(vecs, words, images, offsets, norm, scale, n_img, gids, idf, qv, qw, qs, qscale, alpha, thr):
        s = _shard_scores(kind, n_queries, pairs_cap, vecs, words, images, offsets, norm, scale, n_img, idf, qv, qw,
                          qs, qscale, alpha, thr)
        top, idx = jax.lax.top_k(s, k)
        # the global merge: every shard's candidates to every device (k per shard), then one stable order
        ids = jax.lax.all_gather(gids[0][idx], ax)  # [S, B, k]
        scores = jax.lax.all_gather(top, ax)
        n_s, b, _ = ids.shape
        ids = jnp.transpose(ids, (1, 0, 2)).reshape(b, n_s * k)
        scores = jnp.transpose(scores, (1, 0, 2)).reshape(b, n_s * k)
        key = -(scores + 0.0)  # one sign for zero: -0.0 and 0.0 tie, as numpy compares them
        _, ids, scores = jax.lax.sort((key, ids, scores), dimension=1, num_keys=2)
        return ids, scores

    specs = (P(ax),) * 8 + (P(),) * 7
    return _shard_map(per_shard, mesh=sidx.mesh, in_specs=specs, out_specs=(P(), P()))(
        *_shard_args(sidx), sidx.gids, sidx.idf, qv, qw, qs, qscale, alpha, thr)


@functools.partial(jax.jit, static_argnames=("n_queries", "kind", "pairs_cap"))
def _block_scores(sidx: ShardedIndex, qv, qw, qs, qscale, alpha, thr, *, n_queries: int, kind: str,
                  pairs_cap: int):
    """``[S, B, I]`` scores of every shard's local slots (sharded over the mesh axis)."""
    ax = sidx.axis

    def per_shard(vecs, words, images, offsets, norm, scale, n_img, idf, qv, qw, qs, qscale, alpha, thr):
        return _shard_scores(kind, n_queries, pairs_cap, vecs, words, images, offsets, norm, scale, n_img, idf,
                             qv, qw, qs, qscale, alpha, thr)[None]

    specs = (P(ax),) * 7 + (P(),) * 7
    return _shard_map(per_shard, mesh=sidx.mesh, in_specs=specs, out_specs=P(ax))(
        *_shard_args(sidx), sidx.idf, qv, qw, qs, qscale, alpha, thr)


def _check(sidx: ShardedIndex, alpha, threshold, topk, kernel):
    if not isinstance(sidx, ShardedIndex):
        raise ValueError(f"expected a ShardedIndex, got {type(sidx).__name__}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} for a sharded index (the numba CPU kernel cannot run "
                         f"inside shard_map), got {kernel!r}")
    return api.check_query_params(sidx, alpha, threshold, topk, kernel)


def _batch_inputs(sidx: ShardedIndex, batch):
    q = (batch.vecs, batch.words, batch.slots, batch.q_scale)
    if jax.process_count() > 1:  # a multi-process jit takes global arrays
        q = tuple(_replicated(sidx.mesh, x) for x in q)
    return q


def _kernel_view(sidx: ShardedIndex) -> ShardedIndex:
    """``sidx`` without its id map and names, for the jitted kernels (which score slots): an add that changes
    them changes no program."""
    return sidx if sidx.ids is None and sidx.names is None else dataclasses.replace(sidx, ids=None, names=None)


def query_aggregated(sidx: ShardedIndex, agg: Aggregated, *, alpha: float = 3.0, similarity_threshold: float = 0.0,
                     topk: int | None = None, kernel: str = "auto", engine: str | None = None) -> api.QueryResult:
    """:func:`jasmk.query_aggregated` on a sharded index: the same ranks and scores as the single-device index.

    ``kernel``: ``"auto"``, ``"dense"``, ``"sparse"`` / ``"sparse-xla"`` (XLA kernels only; ``engine``: 0.1's name
    for it, warns)."""
    kernel = engine_mod.kernel_arg(kernel, engine) if engine is not None else kernel
    alpha, thr = _check(sidx, alpha, similarity_threshold, topk, kernel)
    api.check_aggregated(sidx, agg)
    n = sidx.n_images
    n_q = int(np.unique(agg.images).size)
    k = n if topk is None else min(int(topk), n)
    memory.require(2 * n_q * k * 12, f"ranks and scores of {n_q} queries x {k} images",
                   hint="pass a smaller topk (topk=None ranks every image slot)")
    i_cap = int(sidx.norm_factor.shape[1])
    k_shard = i_cap if topk is None else min(int(topk), i_cap)
    a32, t32 = np.float32(alpha), np.float32(thr)
    out_ids, out_ranks, out_scores = [], [], []
    for batch in engine_mod.batches(agg, **_layout(sidx)):
        kind, cap = _kernel(sidx, batch, kernel)
        ids, scores = _ranked(_kernel_view(sidx), *_batch_inputs(sidx, batch), a32, t32, n_queries=batch.n_queries,
                              k=k_shard,
                              kind=kind, pairs_cap=cap)
        b = len(batch.ids)
        out_ids.append(batch.ids)
        out_ranks.append(ivf_mod.public_ids(sidx, _replica(ids)[:b, :k]))
        out_scores.append(_replica(scores)[:b, :k])
    return api.QueryResult(np.concatenate(out_ids).astype(np.int64), np.concatenate(out_ranks),
                           np.concatenate(out_scores))


def query(sidx: ShardedIndex, qfeats, qids, *, multiple_assignment: int = 5, alpha: float = 3.0,
          similarity_threshold: float = 0.0, topk: int | None = None, quantizer: str = "faiss", word_ids=None,
          kernel: str = "auto", engine: str | None = None) -> api.QueryResult:
    """:func:`jasmk.query` on a sharded index (queries replicated, per-shard top-k, global merge)."""
    kernel = engine_mod.kernel_arg(kernel, engine) if engine is not None else kernel
    _check(sidx, alpha, similarity_threshold, topk, kernel)
    agg = api.aggregate_images(_codebook(sidx), qfeats, qids, binary=sidx.binary,
                               multiple_assignment=multiple_assignment, quantizer=quantizer, word_ids=word_ids,
                               sort=False)
    return query_aggregated(sidx, agg, alpha=alpha, similarity_threshold=similarity_threshold, topk=topk,
                            kernel=kernel)


def score_matrix_aggregated(sidx: ShardedIndex, agg: Aggregated, *, alpha: float = 3.0,
                            similarity_threshold: float = 0.0, kernel: str = "auto",
                            engine: str | None = None) -> np.ndarray:
    """:func:`jasmk.score_matrix_aggregated` on a sharded index: each shard's block placed by columns."""
    kernel = engine_mod.kernel_arg(kernel, engine) if engine is not None else kernel
    alpha, thr = _check(sidx, alpha, similarity_threshold, None, kernel)
    api.check_aggregated(sidx, agg)
    h = _host_info(sidx)
    n_q = int(np.unique(agg.images).size)
    memory.require(2 * n_q * h.n_images * 4, f"a dense {n_q} x {h.n_images} score matrix",
                   hint="use jasmk.shard.query(..., topk=k) for the best k per query, or fewer query images")
    i_cap = int(sidx.norm_factor.shape[1])
    cols = [_gids(r, i_cap) for r in h.ranges]
    a32, t32 = np.float32(alpha), np.float32(thr)
    rows = []
    for batch in engine_mod.batches(agg, **_layout(sidx)):
        kind, cap = _kernel(sidx, batch, kernel)
        blocks = _to_host(_block_scores(_kernel_view(sidx), *_batch_inputs(sidx, batch), a32, t32,
                                        n_queries=batch.n_queries,
                                        kind=kind, pairs_cap=cap))
        b = len(batch.ids)
        out = np.zeros((b, h.n_images), np.float32)
        for si, g in enumerate(cols):
            m = sum(y - x for x, y in h.ranges[si])
            out[:, g[:m]] = blocks[si, :b, :m]
        rows.append(out)
    return np.concatenate(rows)


def score_matrix(sidx: ShardedIndex, qfeats, qids, *, multiple_assignment: int = 5, alpha: float = 3.0,
                 similarity_threshold: float = 0.0, quantizer: str = "faiss", word_ids=None,
                 kernel: str = "auto", engine: str | None = None) -> np.ndarray:
    """:func:`jasmk.score_matrix` on a sharded index: ``[n_query, n_images] float32``."""
    kernel = engine_mod.kernel_arg(kernel, engine) if engine is not None else kernel
    _check(sidx, alpha, similarity_threshold, None, kernel)
    agg = api.aggregate_images(_codebook(sidx), qfeats, qids, binary=sidx.binary,
                               multiple_assignment=multiple_assignment, quantizer=quantizer, word_ids=word_ids,
                               sort=False)
    return score_matrix_aggregated(sidx, agg, alpha=alpha, similarity_threshold=similarity_threshold,
                                   kernel=kernel)


# ---------------------------------------------------------------------------------------------------------
# serialization: the format and its checks are in jasmk.storage.shard_format; here, the placement on a mesh


def to_arrays(sidx: ShardedIndex):
    """``(arrays, fields)`` of :mod:`jasmk.storage.shard_format`: each shard's real postings (local image ids) and
    normalization, the per-word arrays, and the other fields (shard id ranges included); :func:`from_arrays`
    inverts it, onto any mesh."""
    h = _host_info(sidx)
    s = sidx.n_shards
    missing = [si for si in range(s) if si not in h.segments]
    if missing:
        raise ValueError(f"shards {missing[:5]} live in other processes: save a sharded index from a process "
                         "that holds every shard (multi-process saves are not implemented)")
    postings = []
    for si in range(s):
        hs = ivf_mod.host(h.segments[si])
        e = int(hs.offsets[-1])
        postings.append((hs.vecs[:e], hs.words[:e], hs.images[:e], hs.norm_factor[: hs.n_images]))
    return shard_format.to_arrays(sidx.caches["centroids"], h.counts, h.idf, postings, ranges=h.ranges,
                                  n_images=h.n_images, imid_offset=sidx.imid_offset, binary=sidx.binary,
                                  use_idf=sidx.use_idf, dim=sidx.dim, codebook_size_param=sidx.codebook_size_param,
                                  names=None if sidx.ids is None else sidx.ids.names, dense_ids=sidx.dense_ids,
                                  image_names=sidx.names)


def from_arrays(arrays, fields, *, mesh, axis=None, where: str = "the arrays") -> ShardedIndex:
    """A :class:`ShardedIndex` on ``mesh`` from :func:`to_arrays` output, after the checks of
    :func:`jasmk.storage.shard_format.read`. A mesh axis of the saved size keeps the shards as they were; another
    size re-splits the postings by posting count (on the host: the whole index passes through this process's
    memory).

    Raises:
        ValueError: naming the first problem found.
    """
    mesh, axis = _check_mesh(mesh, axis)
    data = shard_format.read(arrays, fields, where=where, max_entries=MAX_SHARD_ENTRIES)
    head, ranges, parts = data.header, data.ranges, data.parts
    n_images, imid_offset, binary, use_idf, dim = head.n_images, head.imid_offset, head.binary, head.use_idf, head.dim
    centroids, counts, idf, k = head.centroids, head.counts, head.idf, head.centroids.shape[0]
    width = packed_width(dim) if binary else dim
    s = int(mesh.shape[axis])
    size_param = fields.get("codebook_size_param")
    if s == len(ranges):  # same layout: each shard as saved
        h = _empty_host(k, s, idf.astype(np.float32))
        h.n_images, h.counts, h.ranges = n_images, counts.astype(np.int64), [list(r) for r in ranges]
        mine = set(local_shards(mesh, axis))
        for si, (vecs, words, images, norm, n) in enumerate(parts):
            h.offsets[si, 1:] = np.cumsum(np.bincount(words, minlength=k))
            if si in mine:
                h.segments[si] = (ivf_mod.make_segment(vecs, words, images, image_start=0, n_images=n,
                                                       norm_factor=norm, n_words=k) if n else
                                  _empty_segment(width, binary, k))
        return _assemble(h, centroids=centroids, mesh=mesh, axis=axis, imid_offset=imid_offset, binary=binary,
                         use_idf=use_idf, dim=dim, size_param=size_param, ids=data.ids, dense_ids=data.dense_ids,
                         names=data.image_names)
    # another mesh size: global postings, split again
    g_vecs, g_words, g_images = [], [], []
    g_norm = np.zeros(n_images, np.float32)
    for si, (vecs, words, images, norm, n) in enumerate(parts):
        g = _gids(ranges[si], n).astype(np.int64)
        g_vecs.append(vecs)
        g_words.append(words)
        g_images.append(g[images])
        g_norm[g] = norm
    return _from_postings(centroids, np.concatenate(g_vecs), np.concatenate(g_words), np.concatenate(g_images),
                          norm_factor=g_norm, idf=idf.astype(np.float32), counts=counts, n_images=n_images,
                          mesh=mesh, axis=axis, imid_offset=imid_offset, binary=binary, use_idf=use_idf,
                          size_param=size_param, ids=data.ids, dense_ids=data.dense_ids, names=data.image_names)


def save_sharded_index(path, sidx) -> str:
    """Save a :class:`~jasmk.shard.ShardedIndex` (atomic, versioned, checksummed like :func:`jasmk.save_index`): each
    shard's real postings as its own arrays, the per-word arrays, and the shards' image ranges in the meta
    (:func:`to_arrays`). The saving process must hold every shard (one process; multi-process
    saves are not implemented)."""
    arrays, fields = to_arrays(sidx)
    return checkpoint.save_tree(path, arrays, meta={"kind": "sharded-index", "sharded_index": fields})


def load_sharded_index(path, mesh, *, axis=None):
    """Load a sharded index saved with :func:`save_sharded_index` onto the mesh axis ``axis`` of ``mesh``
    (default: its first axis), checking checksums, dtypes, shapes and ranges. The axis may have another size
    than the one saved: the postings are then split again by posting count. Each process sends only its own
    shards to its devices."""
    tree, meta = checkpoint.load_tree(path)
    if meta.get("kind") != "sharded-index":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a sharded index")
    if not isinstance(tree, dict) or not isinstance(meta.get("sharded_index"), dict):
        raise ValueError(f"sharded index checkpoint {path} holds no arrays or fields")
    return from_arrays(tree, meta["sharded_index"], mesh=mesh, axis=axis, where=str(path))


__all__ = ["KERNELS", "MAX_SHARD_ENTRIES", "ShardedIndex", "add", "add_images", "build_sharded", "empty", "from_arrays",
           "load_sharded_index", "local_shards", "query", "query_aggregated", "save_sharded_index", "score_matrix",
           "score_matrix_aggregated", "shard_index", "to_arrays", "with_distractors"]
