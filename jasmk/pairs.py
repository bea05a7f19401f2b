"""MASt3R-SfM image pairs from a retrieval score matrix: the ``retrieval-Na-k`` scene graph.

``Na`` distinct key images are picked by farthest point sampling on ``1 - S`` (the first one at random, seeded); the key
images form a complete graph; every other image is joined to its nearest key image; and every image is joined
to its ``k`` nearest images (itself excluded). Pairs are undirected ``(i, j)`` with ``i < j``, sorted.
"""

from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)


def parse_scene_graph(spec: str) -> tuple[int, int]:
    """``"retrieval-20-10"`` -> ``(20, 10)``."""
    parts = str(spec).split("-")
    if len(parts) != 3 or parts[0] != "retrieval":
        raise ValueError(f"scene graph must look like 'retrieval-Na-k', got {spec!r}")
    try:
        na, k = int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"scene graph must look like 'retrieval-Na-k' with integers, got {spec!r}") from None
    if na < 0 or k < 0:
        raise ValueError(f"Na and k must be >= 0, got {spec!r}")
    return na, k


def _check_matrix(scores) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"the score matrix must be square [n, n], got shape {s.shape}")
    if s.shape[0] < 2:
        raise ValueError("need at least 2 images to make pairs")
    if not np.isfinite(s).all():
        raise ValueError("the score matrix contains NaN or inf")
    return s


def farthest_point_sampling(dist: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` distinct points, each the farthest from those already picked (first one at random)."""
    rng = np.random.default_rng(seed)
    picked = [int(rng.integers(dist.shape[0]))]
    nearest = dist[picked[0]].copy()
    nearest[picked[0]] = -np.inf
    for _ in range(1, n):
        nxt = int(np.argmax(nearest))
        picked.append(nxt)
        nearest = np.minimum(nearest, dist[nxt])
        nearest[picked] = -np.inf
    return np.asarray(picked)


def retrieval_pairs(scores, *, na: int, k: int, seed: int = 0):
    """Pairs of the ``retrieval-Na-k`` scene graph.

    Args:
        scores: ``[n, n]`` similarity matrix (e.g. :func:`jasmk.score_matrix` of a set against itself).
        na: number of key images (``0``: none), at most ``n``.
        k: nearest neighbours joined to each image.
        seed: picks the first key image.

    Returns:
        ``(pairs [P, 2] int64 with i < j, key_images [na] int64)``.
    """
    s = _check_matrix(scores)
    n = s.shape[0]
    if na > n:
        raise ValueError(f"Na={na} key images asked for, but there are only {n} images")
    dist = 1.0 - s
    pairs = set()
    keys = np.zeros(0, np.int64)
    if na > 0:
        keys = farthest_point_sampling(dist, na, seed=seed)
        for a in range(len(keys)):
            for b in range(a + 1, len(keys)):
                pairs.add((min(keys[a], keys[b]), max(keys[a], keys[b])))
        key_set = set(keys.tolist())
        nearest_key = keys[np.argmin(dist[:, keys], axis=1)]
        for i in range(n):
            if i not in key_set and i != nearest_key[i]:
                pairs.add((min(i, nearest_key[i]), max(i, nearest_key[i])))
    if k > 0:
        order = np.argsort(dist, axis=1, kind="stable")
        for i in range(n):
            for j in order[i][order[i] != i][:k]:
                pairs.add((min(i, j), max(i, j)))
    out = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    log.info("retrieval-%d-%d: %d pairs over %d images", na, k, len(out), n)
    return out, keys.astype(np.int64)


def save_pairs(path, pairs, *, names=None) -> None:
    """Write pairs: ``.npy`` as a ``[P, 2]`` int array, otherwise text with one ``"i j"`` (or ``"name_i name_j"``) per line.

    The file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        if path.endswith(".npy"):
            with open(tmp, "wb") as handle:
                np.save(handle, pairs)
        else:
            if names is not None and (len(names) <= pairs.max(initial=-1)):
                raise ValueError(f"{len(names)} names given but pairs refer to image {pairs.max()}")
            with open(tmp, "w") as handle:
                for i, j in pairs:
                    handle.write(f"{names[i]} {names[j]}\n" if names is not None else f"{i} {j}\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
