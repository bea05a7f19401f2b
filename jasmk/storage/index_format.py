"""The serialized form of an :class:`~jasmk.core.ivf.Index` and its checks.

An index is stored as a PyTree of host arrays (each segment's real postings, without padding, and the per-word
arrays) plus a JSON-able dict of its other fields; nothing read back is trusted before it is checked: dtypes,
shapes, id ranges, word-major order, finite values, segments tiling the image range, counts adding up. The
sharded index (:mod:`jasmk.storage.shard_format`) shares the header and postings checks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..core import ivf
from ..core.aggregate import packed_width
from ..core.names import ImageNames


def to_arrays(index: ivf.Index):
    """``(arrays, fields)``: the index as a PyTree of host arrays (each segment's real postings and images,
    without padding) and a JSON-able dict of its other fields; :func:`from_arrays` inverts it."""
    segs = {}
    for i, s in enumerate(index.segments):
        h = ivf.host(s)
        e = int(h.offsets[-1])
        segs[f"{i:05d}"] = {"norm_factor": h.norm_factor[: h.n_images]}
        if e:  # a segment of images without postings (a gap in the ids) has none: the array store holds no
            # zero-size arrays, and the reader makes empty ones
            segs[f"{i:05d}"].update({"vecs": h.vecs[:e], "words": h.words[:e], "images": h.images[:e]})
    arrays = {"centroids": np.asarray(index.centroids), "counts": np.asarray(index.counts),
              "idf": np.asarray(index.idf), "segments": segs}
    if index.ids is not None:
        arrays["ids"] = np.asarray(index.ids.names, np.int64)
    arrays.update(names_arrays(index.names))
    fields = {"n_images": int(index.n_images), "imid_offset": index.imid_offset, "binary": index.binary,
              "use_idf": index.use_idf, "dim": index.dim, "codebook_size_param": index.codebook_size_param,
              "segment_ranges": [[ivf.host(s).image_start, ivf.host(s).n_images] for s in index.segments],
              "dense_ids": bool(index.dense_ids)}
    return arrays, fields


def id_map(arrays, n_images: int, imid_offset: int, *, where: str):
    """The :class:`~jasmk.core.ivf.IdMap` of a serialized index (None without an ``ids`` array), checked:
    ``[n_images] int64``, strictly increasing, non-negative, and ``imid_offset`` at most the largest name + 1.

    Raises:
        ValueError: naming the problem.
    """
    ids = None
    if "ids" in arrays:
        names = np.asarray(arrays["ids"])
        if names.shape != (n_images,) or names.dtype != np.int64:
            raise problem(where, f"ids must be [{n_images}] int64, got {names.shape} {names.dtype}")
        if names.size and (names[0] < 0 or names[-1] > ivf.MAX_NAME or (np.diff(names) <= 0).any()):
            raise problem(where, "ids must be non-negative and strictly increasing")
        ids = ivf.IdMap(names)
    next_name = int(ids.names[-1]) + 1 if ids is not None and len(ids) else n_images
    if imid_offset > next_name:
        raise problem(where, f"imid_offset {imid_offset} exceeds the largest image name + 1 ({next_name})")
    return ids


def names_arrays(names) -> dict:
    """The arrays that hold :class:`~jasmk.core.names.ImageNames` in a checkpoint (none without names)."""
    if names is None or not len(names):
        return {}
    return {"names_blob": np.asarray(names.blob, np.uint8), "names_offsets": np.asarray(names.offsets, np.int64)}


def image_names(arrays, n_images: int, *, dense_ids: bool, where: str):
    """The :class:`~jasmk.core.names.ImageNames` of a serialized index (None without them), checked: one valid
    UTF-8 name per image, each once, none with a line break.

    Raises:
        ValueError: naming the problem.
    """
    if "names_blob" not in arrays and "names_offsets" not in arrays:
        return None
    if dense_ids:
        raise problem(where, "image names in asmk's dense layout")
    blob, offsets = np.asarray(arrays.get("names_blob")), np.asarray(arrays.get("names_offsets"))
    if blob.dtype != np.uint8 or blob.ndim != 1 or offsets.dtype != np.int64 or offsets.shape != (n_images + 1,):
        raise problem(where, f"image names must be a uint8 blob and [{n_images + 1}] int64 offsets, got "
                             f"{blob.dtype} {blob.shape} and {offsets.dtype} {offsets.shape}")
    try:
        names = ImageNames(blob, offsets)
        text = names.tolist()
        bytes(blob).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise problem(where, f"image names: {exc}") from None
    try:
        ImageNames.from_list(text)
    except ValueError as exc:
        raise problem(where, str(exc)) from None
    return names


def problem(where: str, what: str) -> ValueError:
    """The error for a serialized index that fails a check: what is wrong, and where."""
    return ValueError(f"inconsistent index in {where}: {what}")


@dataclasses.dataclass(frozen=True)
class Header:
    """The index-wide fields of a serialized index (single-device or sharded), checked."""

    n_images: int
    imid_offset: int
    binary: bool
    use_idf: bool
    dim: int
    centroids: np.ndarray
    counts: np.ndarray
    idf: np.ndarray


def check_header(arrays, fields, *, where: str) -> Header:
    """Read and check the index-wide fields (image count, offset, kind, codebook, counts, idf).

    Raises:
        ValueError: naming the first problem found.
    """
    try:
        n_images = int(fields["n_images"])
        imid_offset = int(fields["imid_offset"])
        binary, use_idf, dim = bool(fields["binary"]), bool(fields["use_idf"]), int(fields["dim"])
        centroids = np.asarray(arrays["centroids"])
        counts = np.asarray(arrays["counts"])
        idf = np.asarray(arrays["idf"])
    except (KeyError, TypeError, ValueError) as exc:
        raise problem(where, f"missing or malformed field ({exc!r})") from None
    if centroids.ndim != 2 or centroids.shape[1] != dim or centroids.dtype != np.float32:
        raise problem(where, f"centroids must be [K, {dim}] float32, got {centroids.shape} {centroids.dtype}")
    k = centroids.shape[0]
    if not np.isfinite(centroids).all():
        raise problem(where, "centroids hold NaN or inf")
    if counts.shape != (k,) or idf.shape != (k,) or not np.issubdtype(counts.dtype, np.integer):
        raise problem(where, f"counts / idf must be [{k}] (the codebook size)")
    if not np.isfinite(idf).all() or (idf < 0).any():
        raise problem(where, "idf holds NaN, inf or negative values")
    if n_images < 0 or n_images > 2**31 - 2 or imid_offset < 0:
        raise problem(where, f"imid_offset {imid_offset} / n_images {n_images} out of range")
    return Header(n_images, imid_offset, binary, use_idf, dim, centroids, counts, idf)


def check_postings(vecs, words, images, norm, *, n_images: int, n_words: int, width: int, binary: bool,
                   name: str, where: str) -> None:
    """Check one serialized block of postings (a segment, or a shard): ``vecs [E, width]`` (uint32 for ASMK*,
    finite float32 for ASMK), ``words [E]`` non-decreasing in ``[0, K)``, local ``images [E]`` in
    ``[0, n_images)`` and a finite, non-negative ``norm [n_images]``.

    Raises:
        ValueError: naming the first problem found.
    """
    dtype = np.uint32 if binary else np.float32
    e = words.shape[0]
    if vecs.shape != (e, width) or vecs.dtype != dtype or images.shape != (e,) or words.ndim != 1:
        raise problem(where, f"{name} postings must be [E, {width}] {np.dtype(dtype)} with [E] words and images")
    if norm.shape != (n_images,) or not np.isfinite(norm).all() or (norm < 0).any():
        raise problem(where, f"{name} normalization must be [{n_images}] finite, non-negative")
    if e and (words.min() < 0 or words.max() >= n_words or (np.diff(words) < 0).any()):
        raise problem(where, f"{name} word ids must lie in [0, {n_words}) in non-decreasing order")
    if e and (images.min() < 0 or images.max() >= n_images):
        raise problem(where, f"{name} image ids must lie in [0, {n_images})")
    if not binary and not np.isfinite(vecs).all():
        raise problem(where, f"{name} vectors hold NaN or inf")


def from_arrays(arrays, fields, *, where: str = "the arrays") -> ivf.Index:
    """An :class:`~jasmk.core.ivf.Index` from :func:`to_arrays` output, after checking dtypes, shapes and ranges
    (word ids below ``K``, image ids inside their segment's range, word-major order, finite centroids / idf /
    norms, segments tiling ``[0, n_images)``, ``0 <= imid_offset <= n_images``, counts adding up).

    Raises:
        ValueError: naming the first problem found.
    """
    head = check_header(arrays, fields, where=where)
    n_images, imid_offset, binary, use_idf, dim = head.n_images, head.imid_offset, head.binary, head.use_idf, head.dim
    centroids, counts, idf, k = head.centroids, head.counts, head.idf, head.centroids.shape[0]
    try:
        ranges = [(int(a), int(b)) for a, b in fields["segment_ranges"]]
        segs = arrays.get("segments") or {}
    except (KeyError, TypeError, ValueError) as exc:
        raise problem(where, f"missing or malformed field ({exc!r})") from None
    if len(segs) != len(ranges):
        raise problem(where, f"{len(segs)} segments but {len(ranges)} segment ranges")
    width = packed_width(dim) if binary else dim
    next_start, total = 0, np.zeros(k, np.int64)
    segments = []
    for (start, n), key in zip(ranges, sorted(segs)):
        s = segs[key]
        name = f"segment {key}"
        if not isinstance(s, dict) or "norm_factor" not in s or (set(s) - {"norm_factor"}
                                                                 and not {"vecs", "words", "images"} <= set(s)):
            raise problem(where, f"{name} lacks some of its arrays")
        norm = np.asarray(s["norm_factor"])
        if "vecs" in s:
            vecs, words, images = np.asarray(s["vecs"]), np.asarray(s["words"]), np.asarray(s["images"])
        else:  # no postings in this image range
            vecs = np.zeros((0, width), np.uint32 if binary else np.float32)
            words, images = np.zeros(0, np.int32), np.zeros(0, np.int32)
        if start != next_start or n < 1 or n > ivf.MAX_SEGMENT_IMAGES:
            raise problem(where, f"{name} covers images [{start}, {start + n}), expected to start at {next_start}")
        check_postings(vecs, words, images, norm, n_images=n, n_words=k, width=width, binary=binary, name=name,
                       where=where)
        seg = ivf.make_segment(vecs, words, images, image_start=start, n_images=n, norm_factor=norm, n_words=k,
                               local=True)
        total += np.diff(ivf.host(seg).offsets)
        segments.append(seg)
        next_start = start + n
    if next_start != n_images:
        raise problem(where, f"segments cover {next_start} images, n_images is {n_images}")
    if not np.array_equal(total, counts):
        raise problem(where, "counts do not match the postings")
    ids = id_map(arrays, n_images, imid_offset, where=where)
    dense_ids = bool(fields.get("dense_ids", False))
    names = image_names(arrays, n_images, dense_ids=dense_ids, where=where)
    return ivf.from_segments(centroids, counts.astype(np.int32), idf.astype(np.float32), segments, n_images=n_images,
                             imid_offset=imid_offset, binary=binary, use_idf=use_idf, dim=dim,
                             codebook_size_param=fields.get("codebook_size_param"), ids=ids,
                             dense_ids=dense_ids, names=names)


__all__ = ["Header", "check_header", "check_postings", "from_arrays", "id_map", "image_names", "names_arrays",
           "problem", "to_arrays"]
