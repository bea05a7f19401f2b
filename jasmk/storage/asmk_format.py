"""asmk 0.1.1's pickle formats: its codebook and IVF state dicts, read with the restricted unpickler (nothing in
a pickle runs) and written atomically. :mod:`jasmk.compat` (asmk's API) and the CLI read and write through here.
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np

from ..core import ivf as ivf_mod
from ..core import memory
from ..core.codebook import Codebook
from . import atomic, index_format, safepickle


def read_pickle(path):
    """Read an asmk cache or distractor pickle with the restricted unpickler (loading never runs code).

    Raises:
        ValueError: a damaged, empty or hostile file, or a directory.
    """
    return safepickle.load(path)


def write_pickle(path, data) -> None:
    """Pickle ``data`` to ``path`` atomically (a temp file in the same folder, then a rename)."""
    atomic.write_bytes_with(path, lambda handle: pickle.dump(data, handle), suffix=".pkl")


def codebook_state(codebook: Codebook) -> dict:
    """asmk's codebook pickle content for ``codebook``."""
    return {"type": "Codebook", "params": {"size": codebook.size_param},
            "state": {"centroids": np.asarray(codebook.centroids, np.float32)}}


def codebook_from_state(state) -> Codebook:
    """A :class:`Codebook` from asmk's codebook pickle content."""
    if isinstance(state, dict) and state.get("type") == "IVF":
        raise ValueError("this is asmk's IVF pickle, not its codebook: load_asmk_ivf(path, codebook) reads it")
    if not isinstance(state, dict) or state.get("type") != "Codebook" or "state" not in state:
        raise ValueError("not an asmk codebook state dict (expected type 'Codebook')")
    centroids = state["state"].get("centroids")
    if centroids is None:
        raise ValueError("the asmk codebook state holds no centroids (it was never trained)")
    return Codebook.from_centroids(centroids, size_param=state.get("params", {}).get("size"))




def is_pickle(path) -> bool:
    """Whether the file ``path`` starts like a pickle (protocol 2 or later, as asmk writes them)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(1) == b"\x80"
    except OSError:
        return False


def _state(path_or_state):
    """asmk's pickled state dict from a path (read with the restricted unpickler) or the dict itself."""
    if isinstance(path_or_state, dict):
        return path_or_state
    if isinstance(path_or_state, (str, os.PathLike)) and os.path.isdir(path_or_state):
        raise ValueError(f"cannot read pickle {os.fspath(path_or_state)}: it is a directory, not an asmk pickle; "
                         "jasmk's own codebook and index checkpoints are folders, read by jasmk.load_codebook and "
                         "jasmk.load_index")
    return safepickle.load(path_or_state)  # refuses anything but numpy arrays and plain containers


def load_asmk_codebook(path_or_state) -> Codebook:
    """A codebook from asmk's codebook pickle (or its already loaded state dict)."""
    return codebook_from_state(_state(path_or_state))


def load_asmk_ivf(path_or_state, codebook: Codebook) -> ivf_mod.Index:
    """An :class:`~jasmk.ivf.Index` from asmk's IVF pickle (or state dict), keeping its idf and normalization."""
    state = _state(path_or_state)
    if isinstance(state, dict) and state.get("type") == "Codebook":
        raise ValueError("this is asmk's codebook pickle, not its IVF: load_asmk_codebook(path) reads it")
    if not isinstance(state, dict) or state.get("type") != "IVF" or "state" not in state:
        raise ValueError("not an asmk IVF state dict (expected type 'IVF')")
    st = state["state"]
    counts = np.asarray(st["counts"], np.int64)
    k = codebook.size
    if counts.shape != (k,):
        raise ValueError(f"the asmk IVF has {counts.shape[0]} words but the codebook has {k}")
    vecs, images, words = [], [], []
    for w in np.flatnonzero(counts):
        vecs.append(np.asarray(st["ivf_vecs"][w][: counts[w]]))
        images.append(np.asarray(st["ivf_image_ids"][w][: counts[w]], np.int64))
        words.append(np.full(counts[w], w, np.int32))
    if not vecs:
        raise ValueError("the asmk IVF holds no entries")
    vecs = np.concatenate(vecs)
    binary = vecs.dtype == np.uint32
    d = codebook.dim
    width = -(-d // 32) if binary else d
    if vecs.shape[1] != width:
        raise ValueError(f"asmk IVF vectors have width {vecs.shape[1]}, the codebook implies {width}")
    images = np.concatenate(images).astype(np.int32)
    words = np.concatenate(words)
    n_images = int(st["n_images"])
    if images.min() < 0 or images.max() >= n_images:
        raise ValueError(f"the asmk IVF holds image ids outside [0, {n_images})")
    index = ivf_mod.from_postings(
        codebook.centroids, vecs, words, images, idf=np.asarray(st["idf"], np.float32),
        norm_factor=np.asarray(st["norm_factor"], np.float32), n_images=n_images,
        imid_offset=int(st.get("imid_offset", 0)), binary=bool(binary),
        use_idf=bool(state.get("params", {}).get("use_idf", False)), codebook_size_param=codebook.size_param,
    )
    index = dataclasses.replace(index, dense_ids=True)  # asmk's layout: later adds keep asmk's numbering
    arrays, fields = index_format.to_arrays(index)
    return index_format.from_arrays(arrays, fields, where="the asmk IVF")


def export_asmk_ivf(index: ivf_mod.Index) -> dict:
    """asmk 0.1.1's IVF state dict for ``index`` (``asmk.inverted_file.IVF.initialize_from_state`` reads it).

    asmk numbers images densely (a slot per id up to the largest, ``n_images`` = largest id + 1); an index with
    compact ids is laid out that way here (its idf, computed from its image count, goes with it), and one whose
    dense layout would not fit in memory is refused before anything is allocated.

    Raises:
        ValueError: the dense layout needs more memory than allowed, or ids beyond asmk's int32 range.
    """
    counts = np.asarray(index.counts)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    n_slots = index.next_name
    if n_slots > 2**31 - 1:
        raise ValueError(f"asmk numbers images with int32 ids; this index holds id {n_slots - 1 - index.imid_offset}")
    memory.require(n_slots * 8 + index.n_entries * (index.width * 4 + 12),
                   f"asmk's dense layout of this index ({n_slots} image slots, largest id + 1)",
                   hint="asmk keeps a slot per id up to the largest: renumber the images densely before exporting, "
                        "or save with jasmk.checkpoint.save_index (compact ids)")
    vecs, words, images = ivf_mod.entries(index)
    images = images.astype(np.int64)
    if index.ids is not None:
        images = index.ids.names[images]
    ivf_vecs, ivf_ids = [], []
    for w in range(index.n_words):
        if counts[w] == 0:
            ivf_vecs.append(None)
            ivf_ids.append(None)
        else:
            ivf_vecs.append(vecs[offsets[w]: offsets[w] + counts[w]].copy())
            ivf_ids.append(images[offsets[w]: offsets[w] + counts[w]].copy())
    norm = np.zeros(n_slots)
    np.add.at(norm, images, np.asarray(index.idf, np.float64)[words])
    return {
        "type": "IVF",
        "params": {"use_idf": index.use_idf},
        "state": {
            "norm_factor": norm,
            "n_images": n_slots,
            "ivf_vecs": ivf_vecs,
            "ivf_image_ids": ivf_ids,
            "counts": counts.astype(np.int32),
            "idf": np.asarray(index.idf, np.float32),
            "imid_offset": index.imid_offset,
        },
    }


__all__ = ["codebook_from_state", "codebook_state", "export_asmk_ivf", "load_asmk_codebook", "load_asmk_ivf",
           "is_pickle", "read_pickle", "write_pickle"]
