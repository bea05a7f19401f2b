"""hloc's files: local features in ``features.h5`` and image pairs in ``pairs.txt``.

hloc (Hierarchical-Localization) keeps one HDF5 group per image, named by the image's relative path (h5py
nests a group at every ``/``), holding ``keypoints [N, 2]``, ``descriptors [D, N]`` (descriptor-major, float16
by default) and ``scores [N]``. A pairs file holds one ``query_name db_name`` pair per line, split on
whitespace when read, so names with whitespace cannot go into one. h5py is needed only to read features
(``pip install "jasmk[hloc]"``).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from ..core import memory
from ..core.names import check_names
from . import atomic, paths

log = logging.getLogger(__name__)

__all__ = ["HlocFeatures", "HlocSummary", "is_hdf5", "list_names", "read_features", "read_image_list", "read_pairs",
           "select_names", "summarize", "write_pairs"]

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def is_hdf5(path) -> bool:
    """Whether the file ``path`` starts with HDF5's signature (a ``features.h5``)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == HDF5_MAGIC
    except OSError:
        return False


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError('reading hloc\'s features.h5 needs h5py: pip install "jasmk[hloc]"') from None
    return h5py


def _open(path):
    h5py = _h5py()
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"cannot read {path} as HDF5: {exc}") from None


def list_names(path) -> list:
    """The image names in the ``features.h5`` at ``path``, sorted: every group that holds a dataset, by its full
    path without the leading ``/`` (as hloc lists them)."""
    with _open(path) as handle:
        return _names_in(handle)


def _names_in(handle) -> list:
    h5py = _h5py()
    names = set()

    def visit(_, obj):
        if isinstance(obj, h5py.Dataset):
            names.add(obj.parent.name.strip("/"))

    handle.visititems(visit)
    return sorted(names)


def read_image_list(path) -> list:
    """Image names from a list file, as hloc reads them: one per line, the first whitespace-separated field
    (camera intrinsics may follow it), blank lines and ``#`` comments skipped."""
    if not os.path.isfile(path):
        raise ValueError(f"no such image list: {path}")
    out = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line.split()[0])
    if not out:
        raise ValueError(f"{path} lists no images")
    return out


def select_names(all_names, *, prefix=None, names=None, where: str = "features.h5") -> list:
    """The images to use: those whose name starts with ``prefix`` (a str or several; hloc's ``--db_prefix`` /
    ``--query_prefix``), or exactly ``names`` (hloc's ``--db_list``), or all of ``all_names``.

    Raises:
        ValueError: both given, no image with the prefix, or listed names missing from the file.
    """
    if prefix is not None and names is not None:
        raise ValueError("give a name prefix or a list of names, not both")
    if prefix is not None:
        prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        out = [n for n in all_names if n.startswith(prefixes)]
        if not out:
            raise ValueError(f"no image in {where} has a name starting with {' or '.join(map(repr, prefixes))}")
        return out
    if names is not None:
        names = check_names(names, what="listed image names")
        have = set(all_names)
        missing = [n for n in names if n not in have]
        if missing:
            raise ValueError(f"{len(missing)} listed images are not in {where}, e.g. {missing[0]!r}")
        return names
    if not all_names:
        raise ValueError(f"{where} holds no images (no group with datasets)")
    return list(all_names)


@dataclasses.dataclass(frozen=True)
class HlocFeatures:
    """Local features read from a ``features.h5``, in jasmk's layout.

    Attributes:
        feats: ``[N, D] float32`` descriptors of every image, image after image.
        ids: ``[N] int64`` image id of each descriptor (``0..n-1`` in the order of :attr:`names`, plus the
            ``first_id`` given to :func:`read_features`).
        names: the ``n`` image names (only images with at least one descriptor).
        skipped: names of selected images without descriptors (they cannot be indexed or queried).
    """

    feats: np.ndarray
    ids: np.ndarray
    names: list
    skipped: list


def _descriptor_datasets(handle, chosen, path):
    """``(shapes [(D, N)], datasets, D)`` of the ``descriptors`` of each image in ``chosen``, checked (read from the
    file's metadata only; D is 0 when no image holds a descriptor)."""
    shapes, datasets = [], []
    for name in chosen:
        grp = handle.get(name)
        desc = grp.get("descriptors") if grp is not None and hasattr(grp, "get") else None
        if desc is None or not hasattr(desc, "shape"):
            raise ValueError(f"{path}: image {name!r} has no 'descriptors' dataset (hloc's local features; a "
                             "file of global descriptors holds 'global_descriptor' instead)")
        if len(desc.shape) != 2 or desc.dtype.kind != "f":
            raise ValueError(f"{path}: descriptors of {name!r} are {desc.dtype} {desc.shape}, expected a float "
                             "[D, N] array")
        shapes.append(tuple(int(x) for x in desc.shape))
        datasets.append(desc)
    dims = {s[0] for s in shapes if s[1] > 0}
    if len(dims) > 1:
        counts = {s[1] for s in shapes if s[1] > 0}
        hint = (" (they look stored [N, D]; hloc stores [D, N])" if len(counts) == 1 else "")
        raise ValueError(f"{path}: descriptors have different dimensions {sorted(dims)[:5]}{hint}")
    return shapes, datasets, (dims.pop() if dims else 0)


@dataclasses.dataclass(frozen=True)
class HlocSummary:
    """What a ``features.h5`` holds, from its metadata (no descriptor is read).

    Attributes:
        names: ``[I]`` every image name, sorted (:func:`list_names`).
        counts: ``[I] int64`` descriptors of each image.
        dim: descriptor dimension (0 when no image holds one).
        dtype: the stored descriptors' dtype (``float16`` as hloc writes them).
    """

    names: list
    counts: np.ndarray
    dim: int
    dtype: str


def summarize(path) -> HlocSummary:
    """What ``features.h5`` at ``path`` holds, checked as :func:`read_features` checks it but without reading a
    descriptor (``jasmk info``).

    Raises:
        ValueError: as :func:`read_features`, for everything but the values.
    """
    path = os.fspath(path)
    with _open(path) as handle:
        chosen = _names_in(handle)
        shapes, datasets, dim = _descriptor_datasets(handle, chosen, path)
        dtypes = sorted({str(d.dtype) for d, (_, n) in zip(datasets, shapes) if n})
    return HlocSummary(chosen, np.asarray([n for _, n in shapes], np.int64), int(dim), "/".join(dtypes))


def read_features(path, *, prefix=None, names=None, first_id: int = 0) -> HlocFeatures:
    """Read local descriptors from hloc's ``features.h5`` (``descriptors [D, N]`` per image group, transposed
    here to ``[N, D] float32``).

    Args:
        path: the HDF5 file.
        prefix, names: which images (see :func:`select_names`); default all, sorted by name.
        first_id: id of the first image (the next free id of an index being grown).

    Raises:
        ValueError: a missing or unreadable file, images without ``descriptors``, descriptors of another
            dimension than the others or laid out ``[N, D]``, non-finite values, or more than memory holds.
        ImportError: h5py is not installed.
    """
    path = os.fspath(path)
    with _open(path) as handle:
        chosen = select_names(_names_in(handle), prefix=prefix, names=names, where=path)
        shapes, datasets, dim = _descriptor_datasets(handle, chosen, path)
        total = sum(s[1] for s in shapes)
        if total == 0:
            raise ValueError(f"{path}: the selected images hold no descriptors")
        memory.require(total * dim * 4 + total * 8, f"reading {total} descriptors of {len(chosen)} images",
                       hint="select fewer images (a name prefix or list)")
        feats = np.empty((total, dim), np.float32)
        ids = np.empty(total, np.int64)
        kept, skipped, row = [], [], 0
        for name, (_, n), desc in zip(chosen, shapes, datasets):
            if n == 0:
                skipped.append(name)
                continue
            block = desc[()]  # [D, n] as stored (float16 by default): checked before the copy widens it
            if not np.isfinite(block).all():
                raise ValueError(f"{path}: descriptors of {name!r} hold NaN or inf")
            feats[row:row + n] = block.T
            ids[row:row + n] = int(first_id) + len(kept)
            kept.append(name)
            row += n
    if skipped:
        log.warning("%d images of %s have no descriptors and are left out (e.g. %r)", len(skipped), path, skipped[0])
    log.info("read %d descriptors (%d-d) of %d images from %s", total, dim, len(kept), path)
    return HlocFeatures(feats, ids, kept, skipped)


def _check_pair_name(name, what):
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"{what} {name!r} cannot go into a pairs file: hloc splits each line on whitespace, so "
                         "names must be non-empty and hold no spaces, tabs or line breaks (rename the images)")


def write_pairs(path, pairs) -> str:
    """Write ``pairs`` (``(query_name, db_name)`` tuples) as hloc's pairs file: one ``query db`` line each,
    atomically; refuses to replace anything but a text file and names holding whitespace."""
    pairs = [(q, d) for q, d in pairs]
    for q, d in pairs:
        _check_pair_name(q, "query image name")
        _check_pair_name(d, "database image name")
    path = paths.check_file_target(path, name="pairs file")
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            if b"\0" in handle.read(4096):
                raise ValueError(f"refusing to replace {path}: it exists and is not a text pairs file")
    text = "".join(f"{q} {d}\n" for q, d in pairs)
    atomic.write_bytes_with(path, lambda handle: handle.write(text.encode("utf-8")), suffix=".txt")
    return path


def read_pairs(path) -> list:
    """``[(query_name, db_name)]`` from a pairs file (one whitespace-separated pair per line)."""
    out = []
    with open(path, encoding="utf-8") as handle:
        for i, line in enumerate(handle, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path}:{i}: expected 'query_name db_name', got {line.strip()!r}")
            out.append((parts[0], parts[1]))
    return out
