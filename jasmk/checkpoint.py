"""Persistence: atomic Orbax checkpoints of PyTrees (codebook, index, head parameters) and asmk pickle import/export.

A checkpoint is a directory holding the Orbax-saved arrays and ``meta.json`` (what kind of object it is and
its static fields). It is written into a temporary sibling directory and renamed into place only when
complete, so an interrupted save never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from . import ivf as ivf_mod
from .codebook import Codebook

log = logging.getLogger(__name__)

_FORMAT = "jasmk-checkpoint-1"


# ---------------------------------------------------------------------------------------------------------
# generic atomic PyTree checkpoints


def save_tree(path, tree, *, meta: dict | None = None) -> str:
    """Save a PyTree of arrays to the directory ``path`` atomically, with a JSON-able ``meta`` dict.

    An existing checkpoint at ``path`` is replaced only once the new one is completely written.

    Returns:
        The absolute path written.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    try:
        meta_text = json.dumps({"format": _FORMAT, **(meta or {})})
    except TypeError as exc:
        raise ValueError(f"checkpoint meta must be JSON-serializable: {exc}") from exc
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        arrays = jax.tree_util.tree_map(np.asarray, tree)
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "arrays"), arrays)
        with open(os.path.join(tmp, "meta.json"), "w") as handle:
            handle.write(meta_text)
            handle.flush()
            os.fsync(handle.fileno())
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s", path)
    return path


def load_tree(path, *, target=None):
    """Load a checkpoint written by :func:`save_tree`.

    Args:
        path: the checkpoint directory.
        target: optional PyTree with the expected structure (restores into that structure).

    Returns:
        ``(tree, meta)``.

    Raises:
        ValueError: missing, incomplete or corrupt checkpoint.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isdir(path) or not os.path.isfile(meta_path):
        raise ValueError(f"no jasmk checkpoint at {path} (missing directory or meta.json)")
    try:
        with open(meta_path) as handle:
            meta = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt checkpoint meta at {meta_path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a {_FORMAT} checkpoint")
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            if target is not None:
                tree = ckptr.restore(os.path.join(path, "arrays"), item=jax.tree_util.tree_map(np.asarray, target))
            else:
                tree = ckptr.restore(os.path.join(path, "arrays"))
    except Exception as exc:  # orbax raises many kinds of errors for damaged data
        raise ValueError(f"corrupt or incomplete checkpoint arrays in {path}: {exc}") from exc
    return tree, meta


# ---------------------------------------------------------------------------------------------------------
# codebook and index


def save_codebook(path, codebook: Codebook) -> str:
    """Save a :class:`~jasmk.codebook.Codebook` (atomic)."""
    return save_tree(path, {"centroids": codebook.centroids},
                     meta={"kind": "codebook", "size_param": codebook.size_param})


def load_codebook(path) -> Codebook:
    """Load a codebook saved with :func:`save_codebook`."""
    tree, meta = load_tree(path)
    if meta.get("kind") != "codebook":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a codebook")
    if not isinstance(tree, dict) or "centroids" not in tree:
        raise ValueError(f"codebook checkpoint {path} has no centroids")
    return Codebook.from_centroids(np.asarray(tree["centroids"]), size_param=meta.get("size_param"))


_INDEX_META = ["n_images", "n_entries", "max_count", "imid_offset", "binary", "use_idf", "dim", "codebook_size_param"]
_INDEX_DATA = [f.name for f in dataclasses.fields(ivf_mod.Index) if f.name not in _INDEX_META]


def save_index(path, index: ivf_mod.Index) -> str:
    """Save an :class:`~jasmk.ivf.Index` (atomic); static fields go into the meta."""
    tree = {name: getattr(index, name) for name in _INDEX_DATA}
    return save_tree(path, tree, meta={"kind": "index", **{k: getattr(index, k) for k in _INDEX_META}})


def load_index(path) -> ivf_mod.Index:
    """Load an index saved with :func:`save_index`, checking its arrays against its static fields."""
    tree, meta = load_tree(path)
    if meta.get("kind") != "index":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} checkpoint, not an index")
    missing = [n for n in _INDEX_DATA if n not in tree] + [k for k in _INDEX_META if k not in meta]
    if missing:
        raise ValueError(f"index checkpoint {path} lacks {missing}")
    arrays = {n: jnp.asarray(tree[n]) for n in _INDEX_DATA}
    index = ivf_mod.Index(**arrays, **{k: meta[k] for k in _INDEX_META})
    _check_index(index, str(path))
    return index


def _check_index(index: ivf_mod.Index, where: str) -> None:
    k, d = index.centroids.shape
    e = index.n_entries
    problems = []
    if d != index.dim:
        problems.append(f"centroid dim {d} != dim {index.dim}")
    if index.word_offsets.shape != (k + 1,) or index.counts.shape != (k,) or index.idf.shape != (k,):
        problems.append("per-word arrays do not match the codebook size")
    if index.norm_factor.shape != (index.n_images,):
        problems.append(f"norm_factor has shape {index.norm_factor.shape}, expected ({index.n_images},)")
    e_pad = index.entry_vecs.shape[0]
    if e_pad < e or e_pad % ivf_mod.ENTRY_BLOCK or index.entry_images.shape != (e_pad,) \
            or index.entry_words.shape != (e_pad,):
        problems.append(f"entry arrays must hold n_entries={e} rows padded to a multiple of {ivf_mod.ENTRY_BLOCK}")
    width = -(-d // 32) if index.binary else d
    if index.entry_vecs.ndim != 2 or index.entry_vecs.shape[1] != width:
        problems.append(f"entry vectors have shape {index.entry_vecs.shape}, expected width {width}")
    if not problems and int(np.asarray(index.counts).sum()) != e:
        problems.append("counts do not add up to n_entries")
    if problems:
        raise ValueError(f"inconsistent index in {where}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------
# asmk 0.1.1 pickles


def _state(path_or_state):
    if isinstance(path_or_state, dict):
        return path_or_state
    try:
        with open(path_or_state, "rb") as handle:
            return pickle.load(handle)
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"cannot read asmk pickle {path_or_state}: {exc}") from exc


def load_asmk_codebook(path_or_state) -> Codebook:
    """A codebook from asmk's codebook pickle (or its already loaded state dict)."""
    from .compat import codebook_from_state

    return codebook_from_state(_state(path_or_state))


def load_asmk_ivf(path_or_state, codebook: Codebook) -> ivf_mod.Index:
    """An :class:`~jasmk.ivf.Index` from asmk's IVF pickle (or state dict), keeping its idf and normalization."""
    state = _state(path_or_state)
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
    index = ivf_mod.from_postings(
        codebook.centroids, vecs, words, images, idf=np.asarray(st["idf"], np.float32),
        norm_factor=np.asarray(st["norm_factor"], np.float32), n_images=int(st["n_images"]),
        imid_offset=int(st.get("imid_offset", 0)), binary=bool(binary),
        use_idf=bool(state.get("params", {}).get("use_idf", False)), codebook_size_param=codebook.size_param,
    )
    _check_index(index, "the asmk IVF")
    return index


def export_asmk_ivf(index: ivf_mod.Index) -> dict:
    """asmk 0.1.1's IVF state dict for ``index`` (``asmk.inverted_file.IVF.initialize_from_state`` reads it)."""
    counts = np.asarray(index.counts)
    offsets = np.asarray(index.word_offsets)
    vecs, words, images = ivf_mod.entries(index)
    images = images.astype(np.int64)
    ivf_vecs, ivf_ids = [], []
    for w in range(index.n_words):
        if counts[w] == 0:
            ivf_vecs.append(None)
            ivf_ids.append(None)
        else:
            ivf_vecs.append(vecs[offsets[w]: offsets[w] + counts[w]].copy())
            ivf_ids.append(images[offsets[w]: offsets[w] + counts[w]].copy())
    norm = np.zeros(index.n_images)
    np.add.at(norm, images, np.asarray(index.idf, np.float64)[words])
    return {
        "type": "IVF",
        "params": {"use_idf": index.use_idf},
        "state": {
            "norm_factor": norm,
            "n_images": index.n_images,
            "ivf_vecs": ivf_vecs,
            "ivf_image_ids": ivf_ids,
            "counts": counts.astype(np.int32),
            "idf": np.asarray(index.idf, np.float32),
            "imid_offset": index.imid_offset,
        },
    }


__all__ = [
    "export_asmk_ivf", "load_asmk_codebook", "load_asmk_ivf", "load_codebook", "load_index", "load_tree",
    "save_codebook", "save_index", "save_tree",
]
