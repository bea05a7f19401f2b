"""MASt3R-SfM image pairs from a retrieval score matrix: the ``retrieval-Na-k`` scene graph.

Given a square similarity matrix ``S`` (``S[q, d]``: query image ``q`` against database image ``d``, the same image
set on both sides, e.g. :func:`jasmk.score_matrix` of a collection against its own index; raw ASMK scores,
not normalized, and not necessarily symmetric), MASt3R-SfM works on the distance ``D = 1 - S`` and

1. picks ``Na`` key images by farthest point sampling: the first at random, then repeatedly the image whose
   smallest distance ``D[key, image]`` to the keys so far is the largest;
2. joins the key images in a complete graph;
3. joins every other image ``i`` to its nearest key image (``argmin D[i, keys]``);
4. joins every image ``i`` to the images among the first ``k`` of ``argsort(D[i])``. That list includes ``i``
   itself, which gives no pair, so when ``S[i, i]`` tops its row (as a self-match does) ``i`` gets ``k - 1``
   neighbours. ``knn_excludes_self=True`` leaves ``i`` out of the list and gives it ``k`` neighbours.

Pairs are undirected and de-duplicated: ``(i, j)`` with ``i < j``, sorted (``symmetrize=True`` adds ``(j, i)``
as MASt3R's ``make_pairs`` does before matching).

:func:`retrieval_pairs_from_index` gives the same pairs from an index and the images' query rows without the
``n x n`` matrix (memory ``O(n (Na + k))``): the ``Na`` key images' rows one at a time for step 1, then one pass
over the images as queries, a batch of rows at a time, keeping only the key-image columns and the ``k`` nearest.

Differences from MASt3R's numpy code, all in degenerate cases: key images are always distinct (MASt3R could pick
an image twice when several rows are identical), and ties in step 4 are broken by the lower index (a stable
sort). The first key image is ``np.random.RandomState(seed).choice(n)``, the same draw MASt3R makes after
``np.random.seed(seed)``.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np

from . import api as api_mod
from .core import engine as engine_mod
from .core import memory, validate
from .storage import atomic, hloc

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^retrieval-(\d+)-(\d+)$")


def parse_scene_graph(spec: str) -> tuple[int, int]:
    """``"retrieval-20-10"`` -> ``(Na, k) = (20, 10)``; ValueError for anything else."""
    m = _SPEC.match(str(spec).strip())
    if m is None:
        raise ValueError(f"scene graph must look like 'retrieval-Na-k' with integers Na, k >= 0, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def _check_matrix(scores) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"the score matrix must be square [n, n], got shape {s.shape}")
    if s.shape[0] == 0:
        raise ValueError("the score matrix is empty")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise ValueError(f"the score matrix must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("the score matrix contains NaN or inf")
    return s


def _check_count(x, name: str) -> int:
    if not validate.is_int(x) or x < 0:
        raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    return int(x)


def _check_seed(seed) -> int:
    if not validate.is_int(seed) or not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return int(seed)


def _fps(row, size: int, n: int, seed: int) -> np.ndarray:
    """Farthest point sampling over ``size`` points; ``row(a)`` is ``[size] float64``, the distances from ``a``.
    Rows are asked for one at a time, only for the points picked (the last one's is never needed)."""
    if not 0 <= n <= size:
        raise ValueError(f"cannot pick {n} of {size} points")
    if n == 0:
        return np.zeros(0, np.int64)
    picked = np.empty(n, np.int64)
    picked[0] = np.random.RandomState(seed).choice(size)
    if n == 1:
        return picked
    nearest = np.array(row(picked[0]), np.float64)  # distance of each candidate to its closest pick so far
    nearest[picked[0]] = -np.inf
    for t in range(1, n):
        picked[t] = np.argmax(nearest)
        if t + 1 < n:
            nearest = np.minimum(nearest, row(picked[t]))
            nearest[picked[: t + 1]] = -np.inf
    return picked


def farthest_point_sampling(dist, n: int, *, seed: int = 0) -> np.ndarray:
    """``[n] int64`` distinct indices: a random first one, then each the farthest from those picked.

    Args:
        dist: ``[N, N]`` distances; ``dist[a, b]`` is from picked image ``a`` to candidate ``b``.
        n: how many to pick, ``0 <= n <= N``.
        seed: the first index is ``np.random.RandomState(seed).choice(N)``.
    """
    d = np.asarray(dist, np.float64)
    return _fps(lambda a: d[a], d.shape[0], n, seed)


def _canonical(edges: np.ndarray) -> np.ndarray:
    """``[E, 2]`` -> unique ``[P, 2]`` with ``i < j`` (self edges dropped), sorted."""
    e = np.sort(np.asarray(edges, np.int64).reshape(-1, 2), axis=1)
    e = e[e[:, 0] != e[:, 1]]
    return np.unique(e, axis=0) if len(e) else np.zeros((0, 2), np.int64)


def retrieval_pairs(scores, *, na: int, k: int, seed: int = 0, knn_excludes_self: bool = False,
                    symmetrize: bool = False):
    """Pairs of the ``retrieval-Na-k`` scene graph (see the module docstring).

    Args:
        scores: ``[n, n]`` similarities, row = query image, column = database image.
        na: number of key images, ``0 <= na <= n`` (0: no key images).
        k: length of each image's nearest-neighbour list (clipped to ``n``).
        seed: picks the first key image.
        knn_excludes_self: leave an image out of its own neighbour list (``k`` neighbours rather than MASt3R's
            ``k`` entries including itself).
        symmetrize: also return ``(j, i)`` for every pair.

    Returns:
        ``(pairs [P, 2] int64, key_images [na] int64)``; pairs are ``i < j`` and sorted, or, when symmetrized,
        those followed by the same pairs reversed.
    """
    s = _check_matrix(scores)
    na, k = _check_count(na, "Na"), _check_count(k, "k")
    n = s.shape[0]
    if na > n:
        raise ValueError(f"Na={na} key images asked for, but there are only {n} images")
    dist = 1.0 - s
    keys = farthest_point_sampling(dist, na, seed=_check_seed(seed))
    nn = None
    if k > 0:
        d = dist.copy()
        if knn_excludes_self:
            np.fill_diagonal(d, np.inf)
        kk = min(k, n - 1 if knn_excludes_self else n)
        nn = np.argsort(d, axis=1, kind="stable")[:, :kk]
    pairs = _graph(n, keys, dist[:, keys] if na > 0 else None, nn)
    log.info("retrieval-%d-%d: %d pairs over %d images", na, k, len(pairs), n)
    if symmetrize:
        pairs = np.concatenate([pairs, pairs[:, ::-1]])
    return pairs, keys


def _graph(n: int, keys: np.ndarray, key_dist, nn) -> np.ndarray:
    """The scene graph's pairs from its parts.

    Args:
        n: image count.
        keys: ``[na] int64`` key images in sampling order.
        key_dist: ``[n, na] float64`` distance from each image (as a query) to each key image (None when
            ``na = 0``); ties go to the key picked first.
        nn: ``[n, kk] int64`` each image's neighbour list (None or ``kk = 0``: no k-NN edges).
    """
    parts = []
    if len(keys):
        a, b = np.triu_indices(len(keys), 1)
        parts.append(np.stack([keys[a], keys[b]], axis=1))  # complete graph on the keys
        nearest_key = keys[np.argmin(key_dist, axis=1)]  # first key (FPS order) on ties
        others = np.setdiff1d(np.arange(n), keys)
        parts.append(np.stack([others, nearest_key[others]], axis=1))
    if nn is not None and nn.shape[1]:
        kk = nn.shape[1]
        parts.append(np.stack([np.repeat(np.arange(n), kk), np.asarray(nn, np.int64).reshape(-1)], axis=1))
    return _canonical(np.concatenate(parts) if parts else np.zeros((0, 2), np.int64))


def _first_k(scores: np.ndarray, kk: int, exclude=None) -> np.ndarray:
    """``[b, kk] int64``: per row, the first ``kk`` columns of ``argsort(1 - float64(scores), kind="stable")``
    (what :func:`retrieval_pairs` takes), without sorting or converting whole rows.

    Args:
        scores: ``[b, n] float32`` (not modified).
        kk: ``1 <= kk <= n`` (``n - 1`` when excluding).
        exclude: optional ``[b]`` column per row to leave out (the dense path's ``inf`` distance).

    The ``kk``-th smallest distance is ``T = 1 - v`` for ``v`` the ``kk``-th largest score (the map is monotone).
    Two float32 scores whose float64 distances round to the same value differ by at most ``2**-52 * |T|``, so
    every column tied with ``T`` scores at least ``v - 2**-50 (2 + |v|)``: those columns, a handful unless many
    scores tie, are the only ones whose distances are computed and sorted (stably, in column order).
    """
    s = np.array(scores, np.float32)
    b, n = s.shape
    if exclude is not None:
        s[np.arange(b), exclude] = -np.inf
    v = np.partition(s, n - kk, axis=1)[:, n - kk].astype(np.float64)  # the kk-th largest score of each row
    t = 1.0 - v
    bound = v - 2.0**-50 * (2.0 + np.abs(v))
    lo = bound.astype(np.float32)
    lo = np.where(lo.astype(np.float64) > bound, np.nextafter(lo, np.float32(-np.inf)), lo)  # round down
    out = np.empty((b, kk), np.int64)
    for r in range(b):  # b <= the engine's batch size
        cand = np.flatnonzero(s[r] >= lo[r])
        d = 1.0 - s[r, cand].astype(np.float64)
        keep = d <= t[r]
        out[r] = cand[keep][np.argsort(d[keep], kind="stable")[:kk]]
    return out


def retrieval_pairs_from_index(index, query_agg, *, na: int, k: int, seed: int = 0, knn_excludes_self: bool = False,
                               symmetrize: bool = False, alpha: float = 3.0, similarity_threshold: float = 0.0,
                               kernel: str = "auto", progress: bool = False,
                               engine: str | None = None):
    """:func:`retrieval_pairs` of the score matrix of a collection against its own index, without the matrix.

    The result is identical to ``retrieval_pairs(jasmk.score_matrix_aggregated(index, query_agg, ...), ...)``
    (same pairs, same key images, ties broken the same way) while memory stays ``O(n (Na + k))`` plus one
    batch of score rows (at most 64 x n float32): the dense matrix is never formed.

    * Farthest point sampling scores each key image as a query against the whole index, one row at a time
      (``Na - 1`` rows; row ``a`` of the matrix is image ``a`` as a query).
    * One pass over the images as queries, a batch at a time (the batches :func:`jasmk.score_matrix` uses),
      keeps each image's scores against the key images (``[n, Na]``, for the nearest key image) and its
      ``k``-nearest list, selected exactly as the dense path's stable argsort of ``1 - S`` would.

    The pass scores every image against the whole index, as the dense matrix does: the time is that of
    :func:`jasmk.score_matrix_aggregated` plus ``Na - 1`` single queries.

    Args:
        index: the :class:`~jasmk.ivf.Index` of the ``n`` images (any ids, no distractors).
        query_agg: :class:`~jasmk.aggregate.Aggregated` rows of the same ``n`` images as queries, every id of
            the index present, grouped ascending, e.g. ``jasmk.aggregate_images(index.centroids, feats, ids,
            binary=index.binary, multiple_assignment=5)`` (MASt3R: 5 assignments for queries, 1 in the index).
        na, k, seed, knn_excludes_self, symmetrize: as :func:`retrieval_pairs`.
        alpha, similarity_threshold, kernel: scoring, as :func:`jasmk.query` (``engine``: 0.1's name for
            ``kernel``, warns).
        progress: a progress bar on stderr for the pass over the images.

    Returns:
        ``(pairs [P, 2] int64, key_images [na] int64)``, as :func:`retrieval_pairs`.
    """
    na, k = _check_count(na, "Na"), _check_count(k, "k")
    seed = _check_seed(seed)
    kernel = engine_mod.kernel_arg(kernel, engine)
    alpha, thr = api_mod.check_query_params(index, alpha, similarity_threshold, None, kernel)
    api_mod.check_aggregated(index, query_agg)
    if index.imid_offset:
        raise ValueError(f"the index holds {index.imid_offset} distractor images: pairs need the index of the "
                         "images alone (query ids = index ids)")
    n = int(index.n_images)
    names = index.image_ids  # ids of the matrix's rows and columns (0..n-1 for a densely numbered collection)
    images = np.asarray(query_agg.images)
    bounds = np.flatnonzero(np.diff(images)) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    stops = np.concatenate([bounds, [images.shape[0]]]).astype(np.int64)
    ids = images[starts]
    if ids.size != n or not np.array_equal(ids, names):
        raise ValueError(f"the query rows must hold every image of the index once, with the index's ids in order "
                         f"({n} images, ids {int(names[0])}..{int(names[-1])}), got {ids.size} images with ids "
                         f"{int(ids[0])}..{int(ids[-1])}")
    if na > n:
        raise ValueError(f"Na={na} key images asked for, but there are only {n} images")
    kk = min(k, n - 1 if knn_excludes_self else n)
    rows_per_batch = engine_mod.MAX_BATCH
    memory.require(rows_per_batch * n * 13 + n * (4 * na + 8 * kk) + 64 * (n * (kk + 1) + na * na),
                   f"retrieval pairs over {n} images (scores against {na} key images, {kk} neighbours each, "
                   f"a batch of {rows_per_batch} score rows)", hint="ask for fewer key images (Na) or neighbours (k)")

    def scores_of(batch) -> np.ndarray:
        s = engine_mod.dense_scores(index, batch, alpha, thr, kernel=kernel)
        if not np.isfinite(s).all():
            raise ValueError("the index gives NaN or inf scores: check the indexed and query vectors")
        return s

    def row(a: int) -> np.ndarray:  # image a as a query against every image: a row of the matrix
        sel = slice(int(starts[a]), int(stops[a]))
        one = query_agg._replace(vecs=query_agg.vecs[sel], words=query_agg.words[sel], images=images[sel])
        (batch,) = engine_mod.batches(one, **engine_mod.layout(index))
        return 1.0 - scores_of(batch)[0].astype(np.float64)

    keys = _fps(row, n, na, seed)
    key_scores = np.zeros((n, na), np.float32) if na else None
    nn = np.zeros((n, kk), np.int64) if kk else None
    if na or kk:
        with api_mod.progress_bar(n, "pairs", progress) as bar:
            for batch in engine_mod.batches(query_agg, **engine_mod.layout(index)):
                q = np.searchsorted(names, np.asarray(batch.ids, np.int64))  # rows: the images' slots
                s = scores_of(batch)
                if na:
                    key_scores[q] = s[:, keys]
                if kk:
                    nn[q] = _first_k(s, kk, q if knn_excludes_self else None)
                bar.update(len(q))
    pairs = _graph(n, keys, 1.0 - key_scores.astype(np.float64) if na else None, nn)
    log.debug("retrieval-%d-%d from the index: %d pairs over %d images", na, k, len(pairs), n)
    if index.ids is not None:  # slots to ids
        pairs, keys = names[pairs], names[keys]
    if symmetrize:
        pairs = np.concatenate([pairs, pairs[:, ::-1]])
    return pairs, keys


def scene_graph_pairs(scores, scene_graph: str = "retrieval-20-10", *, seed: int = 0, **kwargs):
    """:func:`retrieval_pairs` from a scene-graph string such as ``"retrieval-20-10"``.

    As MASt3R's demo, ``Na`` larger than the image count is an error; pass ``min(Na, n)`` yourself to clip it.
    """
    na, k = parse_scene_graph(scene_graph)
    return retrieval_pairs(scores, na=na, k=k, seed=seed, **kwargs)


def _check_names(names, pairs):
    names = [str(x) for x in names]
    if pairs.size and len(names) <= pairs.max():
        raise ValueError(f"{len(names)} names given but the pairs refer to image {pairs.max()}")
    bad = [x for x in names if not x or any(c.isspace() for c in x)]
    if bad:
        raise ValueError(f"image names must be non-empty and without whitespace for a pairs file, got {bad[0]!r}")
    return names


def save_pairs(path, pairs, *, names=None) -> None:
    """Write pairs: ``*.npy`` as a ``[P, 2] int64`` array, any other name as text, one ``"i j"`` per line,
    or ``"name_i name_j"`` when ``names`` (one per image) are given.

    The file is written under a temporary name and renamed, so a reader never sees half a file.
    """
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or (pairs.size and not np.issubdtype(pairs.dtype, np.integer)):
        raise ValueError(f"pairs must be a [P, 2] int array, got shape {pairs.shape} dtype {pairs.dtype}")
    pairs = pairs.astype(np.int64)
    if pairs.size and pairs.min() < 0:
        raise ValueError("pairs hold negative image indices")
    path = os.fspath(path)
    is_npy = path.endswith(".npy")
    if is_npy and names is not None:
        raise ValueError("names are written to text pair files only; save the .npy without names")
    if names is not None:
        names = _check_names(names, pairs)
    with atomic.replacing(path, suffix=".npy" if is_npy else ".txt") as tmp:
        if is_npy:
            with open(tmp, "xb") as handle:
                np.save(handle, pairs)
        else:
            with open(tmp, "x") as handle:
                for i, j in pairs.tolist():
                    handle.write(f"{names[i]} {names[j]}\n" if names is not None else f"{i} {j}\n")
    log.info("%d pairs written to %s", len(pairs), path)


def load_pairs(path, *, names=None) -> np.ndarray:
    """Read pairs written by :func:`save_pairs` as ``[P, 2] int64``; name pairs need the same ``names``."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        out = np.load(path, allow_pickle=False)
        if out.ndim != 2 or out.shape[1] != 2:
            raise ValueError(f"{path} does not hold a [P, 2] array")
        return out.astype(np.int64)
    lookup = {str(x): i for i, x in enumerate(names)} if names is not None else None
    rows = []
    for number, pair in enumerate(hloc.read_pairs(path), 1):  # the text format is hloc's pairs file
        try:
            rows.append([lookup[p] for p in pair] if lookup is not None else [int(p) for p in pair])
        except (KeyError, ValueError):
            raise ValueError(f"{path}: pair {number} names an unknown image: {' '.join(pair)!r}") from None
    return np.asarray(rows, np.int64).reshape(-1, 2)

def topk_pairs(scores, k: int, *, query_names, db_names, exclude_self: bool = True) -> list:
    """Query → database pairs from a ``[n_query, n_db]`` score matrix: each query's ``k`` best database images
    (hloc's ``pairs_from_retrieval``), best first, ties broken by the lower column.

    Args:
        scores: ``[n_query, n_db]`` scores (any float dtype; NaN ranks last).
        k: pairs per query (fewer where the database holds fewer images).
        query_names, db_names: a name per row and per column.
        exclude_self: leave out a database image of the query's own name (a database queried with itself).

    Returns:
        ``[(query_name, db_name), ...]``, query after query.

    Raises:
        ValueError: a matrix that is not 2-D, name lists of the wrong length, or ``k < 1``.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or not np.issubdtype(scores.dtype, np.number):
        raise ValueError(f"scores must be a numeric [n_query, n_db] matrix, got {scores.dtype} {scores.shape}")
    k = _check_count(k, "k")
    query_names, db_names = list(query_names), list(db_names)
    if len(query_names) != scores.shape[0] or len(db_names) != scores.shape[1]:
        raise ValueError(f"{len(query_names)} query names and {len(db_names)} database names for a score matrix of "
                         f"shape {scores.shape}: one name per row and per column")
    column = {name: j for j, name in enumerate(db_names)} if exclude_self else {}
    out = []
    for q, qname in enumerate(query_names):
        row = np.nan_to_num(np.asarray(scores[q], np.float64), nan=-np.inf)
        order = np.argsort(-row, kind="stable")
        self_col = column.get(qname)
        if self_col is not None:
            order = order[order != self_col]
        out.extend((qname, db_names[j]) for j in order[:k].tolist())
    return out


def query_pairs(index, qfeats, qids, k: int, *, query_names=None, exclude_self: bool = True, **query_kwargs) -> list:
    """hloc's retrieval pairs straight from a named index: each query image's ``k`` best database images by
    :func:`jasmk.query` (``query_kwargs``: its options), as ``(query_name, db_name)`` tuples, best first; a
    database image of the query's own name is left out with ``exclude_self`` (a database queried with itself).

    Args:
        index: an index; its image names (built with ``names=``, or from hloc's ``features.h5``), or its ids as
            text for an index without names.
        qfeats, qids: ``[N, D]`` query descriptors and ``[N]`` their image ids (grouped ascending).
        query_names: one name per query image, in ascending id order (default: the query ids as text).

    Raises:
        ValueError: query names not one per query image, or bad input to :func:`jasmk.query`.
    """
    k = _check_count(k, "k")
    if query_names is None:
        query_names = [str(int(i)) for i in np.unique(np.asarray(qids, np.int64))]
    query_names = list(query_names)
    db_ids = index.image_ids
    db_names = index.names.tolist() if index.names is not None else [str(int(i)) for i in db_ids]
    known = set(db_names)
    own = any(n in known for n in query_names) if exclude_self else False
    res = api_mod.query(index, qfeats, qids, topk=min(k + (1 if own else 0), index.n_images), **query_kwargs)
    if len(query_names) != len(res.ids):
        raise ValueError(f"{len(query_names)} query names for {len(res.ids)} query images: one name per image")
    out = []
    for qname, ranks in zip(query_names, res.ranks):  # ranks: database ids, topk <= n_images of them
        picked = [db_names[int(j)] for j in np.searchsorted(db_ids, ranks).tolist()]
        if exclude_self:
            picked = [n for n in picked if n != qname]
        out.extend((qname, n) for n in picked[:k])
    return out


__all__ = ["farthest_point_sampling", "load_pairs", "parse_scene_graph", "query_pairs", "retrieval_pairs",
           "retrieval_pairs_from_index", "save_pairs", "scene_graph_pairs", "topk_pairs"]
