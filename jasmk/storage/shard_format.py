"""The serialized form of a sharded index (:class:`~jasmk.shard.ShardedIndex`) and its checks.

Each shard's real postings (local image ids) and normalization, the per-word arrays, and a JSON-able dict of the
other fields, the shards' image-id ranges included. :func:`read` checks everything before the shard layer places
anything on a mesh: the header and postings checks of :mod:`jasmk.storage.index_format`, per shard, and the
shards' ranges tiling ``[0, n_images)`` without overlap.
"""

from __future__ import annotations

import typing

import numpy as np

from ..core.aggregate import packed_width
from .index_format import Header, check_header, check_postings, id_map, image_names, names_arrays


class ShardData(typing.NamedTuple):
    """A checked serialized sharded index: the header, each shard's image-id ranges, each shard's
    ``(vecs, words int32, local images int64, norm float32, n_images)``, the id map (None: names are slots) and
    whether the index keeps asmk's dense layout."""

    header: Header
    ranges: list
    parts: list
    ids: object = None
    dense_ids: bool = False
    image_names: object = None


def problem(where, what) -> ValueError:
    """The error for a serialized sharded index that fails a check: what is wrong, and where."""
    return ValueError(f"inconsistent sharded index in {where}: {what}")


def to_arrays(centroids, counts, idf, postings, *, ranges, n_images: int, imid_offset: int, binary: bool,
              use_idf: bool, dim: int, codebook_size_param=None, names=None, dense_ids: bool = False,
              image_names=None):
    """``(arrays, fields)`` from the shards' host postings ``[(vecs, words, local images, norm), ...]``.
    Zero-size arrays are left out (Orbax saves none); :func:`read` puts them back."""
    shards = {}
    for si, (vecs, words, images, norm) in enumerate(postings):
        arrays = {"vecs": vecs, "words": words, "images": images, "norm_factor": norm}
        arrays = {name: a for name, a in arrays.items() if a.size}
        if arrays:  # a shard without images or postings has none
            shards[f"{si:05d}"] = arrays
    arrays = {"centroids": centroids, "counts": np.asarray(counts).astype(np.int32), "idf": idf, "shards": shards}
    if names is not None:
        arrays["ids"] = np.asarray(names, np.int64)
    arrays.update(names_arrays(image_names))
    fields = {"n_images": int(n_images), "imid_offset": imid_offset, "binary": binary, "use_idf": use_idf,
              "dim": dim, "codebook_size_param": codebook_size_param,
              "shard_ranges": [[[int(a), int(b)] for a, b in r] for r in ranges], "dense_ids": bool(dense_ids)}
    return arrays, fields


def read(arrays, fields, *, where: str, max_entries: int) -> ShardData:
    """Check a serialized sharded index (:func:`to_arrays` output) and return its parts.

    Raises:
        ValueError: naming the first problem found.
    """
    head = check_header(arrays, fields, where=where)
    n_images, binary, dim, counts, k = head.n_images, head.binary, head.dim, head.counts, head.centroids.shape[0]
    try:
        ranges = [[(int(a), int(b)) for a, b in r] for r in fields["shard_ranges"]]
        shards = arrays.get("shards") or {}
    except (KeyError, TypeError, ValueError) as exc:
        raise problem(where, f"missing or malformed field ({exc!r})") from None
    names = [f"{si:05d}" for si in range(len(ranges))]
    if len(ranges) < 1 or not set(shards) <= set(names):
        raise problem(where, f"shards {sorted(set(shards) - set(names))[:5]} but {len(ranges)} shard range lists")
    owner = np.full(n_images, -1, np.int64)
    for si, r in enumerate(ranges):
        for a, b in r:
            if not 0 <= a < b <= n_images:
                raise problem(where, f"shard {si} range [{a}, {b}) lies outside [0, {n_images})")
            if (owner[a:b] >= 0).any():
                raise problem(where, f"shard {si} range [{a}, {b}) overlaps another shard's images")
            owner[a:b] = si
        if any(r[i][1] > r[i + 1][0] for i in range(len(r) - 1)):
            raise problem(where, f"shard {si} ranges are not ascending")
    if (owner < 0).any():
        raise problem(where, f"the shards do not cover image {int(np.flatnonzero(owner < 0)[0])}")
    total = np.zeros(k, np.int64)
    parts = []
    width = packed_width(dim) if binary else dim
    dtype = np.uint32 if binary else np.float32
    for si, key in enumerate(names):
        sh = shards.get(key) or {}  # zero-size arrays are not saved
        vecs = np.asarray(sh.get("vecs", np.zeros((0, width), dtype)))
        words = np.asarray(sh.get("words", np.zeros(0, np.int32)))
        images = np.asarray(sh.get("images", np.zeros(0, np.int32)))
        norm = np.asarray(sh.get("norm_factor", np.zeros(0, np.float32)))
        n = sum(b - a for a, b in ranges[si])
        name = f"shard {key}"
        check_postings(vecs, words, images, norm, n_images=n, n_words=k, width=width, binary=binary, name=name,
                       where=where)
        e = words.shape[0]
        if e > max_entries:
            raise problem(where, f"{name} holds {e} postings, more than {max_entries}")
        if e > 1:
            same = np.diff(words) == 0
            if (np.diff(images.astype(np.int64))[same] <= 0).any():
                raise problem(where, f"{name} images must ascend within each word")
        total += np.bincount(words, minlength=k) if e else 0
        parts.append((vecs, words.astype(np.int32), images.astype(np.int64), norm.astype(np.float32), n))
    if not np.array_equal(total, counts):
        raise problem(where, "counts do not match the postings")
    ids = id_map(arrays, n_images, head.imid_offset, where=where)
    dense_ids = bool(fields.get("dense_ids", False))
    return ShardData(head, ranges, parts, ids, dense_ids,
                     image_names(arrays, n_images, dense_ids=dense_ids, where=where))


__all__ = ["ShardData", "problem", "read", "to_arrays"]
