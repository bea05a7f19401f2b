"""Retrieval evaluation: the revisited Oxford/Paris protocol (Easy / Medium / Hard mAP and mP@k).

Each query's ground truth (a ``gnd`` dict, as in ``gnd_roxford5k.pkl``) lists ``easy``, ``hard`` and ``junk``
database ids (a ``bbx`` entry may be present and is not used). The three protocols are

=========  ===============  ========================
protocol   positives        ignored (junk)
=========  ===============  ========================
Easy       easy             junk + hard
Medium     easy + hard      junk
Hard       hard             junk + easy
=========  ===============  ========================

Ignored images are removed from a ranking before its average precision is computed with the protocol's
trapezoid rule: the ``j``-th positive (0-based) found at position ``r`` (0-based, after removal) adds
``(p0 + p1) / 2 / n_pos`` with ``p0 = j / r`` (``1`` when ``r = 0``) and ``p1 = (j + 1) / (r + 1)``.
Precision at ``k`` is measured at ``min(k, position of the last positive found)``, 1-based.
Queries with no positive are left out of the means (their AP is NaN).

Layout: rankings here are ``[n_query, k]`` (row ``q`` lists database ids for query ``q``, best first), as
:func:`jasmk.query` returns them; :func:`compute_map` also takes revisitop's transposed ``[n_db, n_query]``.
A ranking may be a top-``k`` list (``k < n_db``): positives beyond it then count as never retrieved.

The per-query work is one jitted function over dense ``[n_db]`` masks, vmapped over (chunks of) queries.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from .core import memory

log = logging.getLogger(__name__)

# (positive keys, ignored keys) of each protocol.
PROTOCOLS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}

# Query rows x database columns handled per jitted call (bounds the mask memory).
_CHUNK_ELEMENTS = 1 << 24


def _ap_one(ranks, positive, junk, kappas):
    """AP, precision at each kappa, and whether there is a positive, for one query.

    Args:
        ranks: ``[k] int32`` database ids, best first.
        positive, junk: ``[n_db] bool`` masks.
        kappas: static tuple of ints.

    Returns:
        ``(ap float32, prk [len(kappas)] float32, has_positive bool)``.
    """
    rel = positive[ranks]
    jnk = junk[ranks].astype(jnp.int32)
    # position after removing the ignored images ranked strictly before (revisitop's shift)
    r = jnp.arange(ranks.shape[0], dtype=jnp.int32) - (jnp.cumsum(jnk) - jnk)
    j = jnp.cumsum(rel.astype(jnp.int32)) - 1  # index of this positive among those found
    npos = jnp.sum(positive.astype(jnp.int32))
    rf, jf = r.astype(jnp.float32), j.astype(jnp.float32)
    p0 = jnp.where(r == 0, 1.0, jf / jnp.maximum(rf, 1.0))
    p1 = (jf + 1.0) / (rf + 1.0)
    ap = jnp.sum(jnp.where(rel, (p0 + p1) * 0.5, 0.0)) / jnp.maximum(npos, 1).astype(jnp.float32)
    pos1 = jnp.where(rel, r + 1, 0)  # 1-based positions of the positives found, 0 elsewhere
    kq = jnp.minimum(jnp.max(pos1, initial=0), jnp.asarray(kappas, jnp.int32))  # [len(kappas)]
    hits = jnp.sum(rel[None, :] & (pos1[None, :] <= kq[:, None]), axis=1)
    prk = hits.astype(jnp.float32) / jnp.maximum(kq, 1).astype(jnp.float32)
    return ap, prk, npos > 0


@functools.partial(jax.jit, static_argnames=("kappas",))
def average_precision_batch(ranks, positive, junk, *, kappas=(1, 5, 10)):
    """Per-query AP and precision@k, vmapped over queries.

    Args:
        ranks: ``[Q, k] int32`` database ids per query, best first.
        positive: ``[Q, n_db] bool`` positives of each query.
        junk: ``[Q, n_db] bool`` images removed from each ranking.
        kappas: static tuple of cut-offs.

    Returns:
        ``(ap [Q] float32, prk [Q, len(kappas)] float32, has_positive [Q] bool)``; rows without a positive
        hold 0 and ``has_positive`` False.
    """
    return jax.vmap(lambda r, p, j: _ap_one(r, p, j, kappas))(ranks, positive, junk)


def _check_kappas(kappas) -> tuple[int, ...]:
    try:
        given = list(kappas)
        out = tuple(int(k) for k in given)
    except (TypeError, ValueError):
        raise ValueError(f"kappas must be a sequence of positive ints, got {kappas!r}") from None
    if any(k < 1 for k in out) or any(k != g for k, g in zip(out, given)):
        raise ValueError(f"kappas must be positive ints, got {kappas!r}")
    return out


def _check_ranks(ranks, n_query: int, n_db: int) -> np.ndarray:
    r = np.asarray(ranks)
    if r.ndim != 2 or r.shape[0] != n_query:
        raise ValueError(f"ranks must be [n_query={n_query}, k], got shape {r.shape}")
    if r.size and not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database ids, got dtype {r.dtype}")
    if r.size and (r.min() < 0 or r.max() >= n_db):
        raise ValueError(f"ranks hold ids outside the database [0, {n_db})")
    if r.shape[1] > 1:
        s = np.sort(r, axis=1)
        if (s[:, 1:] == s[:, :-1]).any():
            raise ValueError("a ranking lists the same database image more than once")
    return r.astype(np.int32)


def mean_average_precision(ranks, positive, junk, *, kappas=(1, 5, 10)):
    """mAP and mP@k over queries.

    Args:
        ranks: ``[n_query, k] int`` database ids per query, best first.
        positive, junk: ``[n_query, n_db] bool`` masks.
        kappas: precision cut-offs.

    Returns:
        ``(map, aps [n_query], mpk [len(kappas)], prs [n_query, len(kappas)])`` as fractions in ``[0, 1]``;
        queries without positives have NaN ``aps``/``prs`` rows and are left out of ``map`` and ``mpk``;
        ``map`` is NaN when no query has a positive.
    """
    positive = np.asarray(positive, bool)
    junk = np.asarray(junk, bool)
    if positive.ndim != 2 or junk.shape != positive.shape:
        raise ValueError(f"positive and junk must be [n_query, n_db] masks of one shape, "
                         f"got {positive.shape} and {junk.shape}")
    kappas = _check_kappas(kappas)
    nq, n_db = positive.shape
    r = _check_ranks(ranks, nq, n_db)
    ap = np.zeros(nq, np.float64)
    prs = np.zeros((nq, len(kappas)), np.float64)
    has = np.zeros(nq, bool)
    if nq and r.shape[1]:
        chunk = int(max(1, min(nq, _CHUNK_ELEMENTS // max(n_db, r.shape[1]))))
        for s in range(0, nq, chunk):
            e = min(s + chunk, nq)
            pad = chunk - (e - s)  # pad the last chunk: one compiled shape
            rr, pp, jj = r[s:e], positive[s:e], junk[s:e]
            if pad:
                rr = np.concatenate([rr, np.zeros((pad, rr.shape[1]), rr.dtype)])
                pp = np.concatenate([pp, np.zeros((pad, n_db), bool)])
                jj = np.concatenate([jj, np.zeros((pad, n_db), bool)])
            a, p, h = average_precision_batch(jnp.asarray(rr), jnp.asarray(pp), jnp.asarray(jj), kappas=kappas)
            ap[s:e] = np.asarray(a)[: e - s]
            prs[s:e] = np.asarray(p)[: e - s]
            has[s:e] = np.asarray(h)[: e - s]
    else:
        has = positive.any(axis=1)
    ap[~has] = np.nan
    prs[~has] = np.nan
    if not has.any():
        log.warning("no query has a positive: mAP is NaN")
        return float("nan"), ap, np.full(len(kappas), np.nan), prs
    return float(np.mean(ap[has])), ap, prs[has].mean(axis=0), prs


def gnd_ids(values, name: str) -> np.ndarray:
    """``[n] int64`` image ids of one gnd list; floats must be whole numbers (never truncated silently)."""
    a = np.asarray(values).reshape(-1)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not (np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and (a == np.round(a)).all()):
            raise ValueError(f"{name} must hold integer image ids, got {a[:5].tolist()} (dtype {a.dtype})")
    return a.astype(np.int64)


def masks_from_gnd(gnd, n_db: int, *, positives, ignore):
    """Dense masks ``(positive [n_query, n_db] bool, junk [n_query, n_db] bool)`` from gnd dicts.

    Args:
        gnd: list of dicts.
        n_db: database size.
        positives, ignore: gnd keys whose ids are positives / ignored (a missing ``junk`` key is an empty list).
    """
    if not isinstance(gnd, (list, tuple)) or not all(isinstance(g, dict) for g in gnd):
        raise ValueError("gnd must be a list of dicts with 'easy', 'hard' and 'junk' id lists")
    memory.require(2 * len(gnd) * int(n_db), f"ground-truth masks of {len(gnd)} queries x {n_db} images",
                   hint="database ids are mask columns (max id + 1): renumber the database densely from 0")
    pos = np.zeros((len(gnd), n_db), bool)
    jnk = np.zeros((len(gnd), n_db), bool)
    for q, g in enumerate(gnd):
        for keys, out in ((positives, pos), (ignore, jnk)):
            for key in keys:
                if key not in g and key != "junk":
                    raise ValueError(f"gnd[{q}] has no '{key}' list (keys: {sorted(g)})")
                ids = gnd_ids(g.get(key, []), f"gnd[{q}]['{key}']")
                if ids.size and (ids.min() < 0 or ids.max() >= n_db):
                    raise ValueError(f"gnd[{q}]['{key}'] holds ids outside [0, {n_db})")
                out[q, ids] = True
    return pos, jnk


def ranks_from_scores(scores) -> np.ndarray:
    """``[n_query, n_db]`` scores -> ``[n_query, n_db] int64`` database ids by decreasing score (stable)."""
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be [n_query, n_db], got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return np.argsort(-s.astype(np.float64), axis=1, kind="stable")


def evaluate_revisited(ranks=None, gnd=None, *, scores=None, ks=(1, 5, 10), n_db: int | None = None,
                       kappas=None):
    """Revisited Oxford/Paris evaluation (Easy, Medium, Hard) of rankings or of a score matrix.

    Args:
        ranks: ``[n_query, k] int`` database ids per query, best first (e.g. ``jasmk.query(...).ranks``).
        gnd: ``n_query`` dicts with ``easy``, ``hard`` (and optionally ``junk``, ``bbx``) id lists.
        scores: instead of ``ranks``, ``[n_query, n_db] float`` scores (e.g. ``jasmk.score_matrix``), ranked
            here by decreasing score (ties: lower id first).
        ks: precision cut-offs (``kappas`` is accepted as an alias).
        n_db: database size (default: the score columns, or the largest id seen + 1).

    Returns:
        ``{"easy"|"medium"|"hard": {"map": float, "mp@k": {k: float}, "aps": [n_query] array, "n_queries": int}}``,
        in percent; ``aps`` is NaN for queries left out (no positive), ``n_queries`` counts those kept.
    """
    if kappas is not None:
        ks = kappas
    ks = _check_kappas(ks)
    if (ranks is None) == (scores is None):
        raise ValueError("pass exactly one of ranks (database ids) and scores (a score matrix)")
    if scores is not None:
        s = np.asarray(scores)
        if s.ndim == 2 and n_db is not None and n_db != s.shape[1]:
            raise ValueError(f"scores have {s.shape[1]} columns but n_db={n_db}")
        ranks = ranks_from_scores(s)
        n_db = s.shape[1]
    else:
        ranks = np.asarray(ranks)
        if ranks.ndim != 2:
            raise ValueError(f"ranks must be [n_query, k], got shape {ranks.shape}")
        if ranks.size and not np.issubdtype(ranks.dtype, np.integer):
            if not (np.issubdtype(ranks.dtype, np.floating) and np.isfinite(ranks).all()
                    and (ranks == np.round(ranks)).all()):
                raise ValueError(f"ranks must hold integer database ids (got dtype {ranks.dtype}); "
                                 "pass a score matrix as scores=")
            ranks = ranks.astype(np.int64)
    if not isinstance(gnd, (list, tuple)) or len(gnd) != ranks.shape[0]:
        raise ValueError(f"gnd must be a list of {ranks.shape[0]} dicts (one per query), "
                         f"got {type(gnd).__name__} of length {len(gnd) if hasattr(gnd, '__len__') else '?'}")
    if n_db is None:
        seen = [ranks.max(initial=-1)] if ranks.size else [-1]
        for g in gnd:
            for k in ("easy", "hard", "junk"):
                if isinstance(g, dict):
                    seen.append(gnd_ids(g.get(k, []), f"gnd['{k}']").max(initial=-1))
        n_db = int(max(seen)) + 1
    out = {}
    for name, (pos_keys, ign_keys) in PROTOCOLS.items():
        pos, jnk = masks_from_gnd(gnd, n_db, positives=pos_keys, ignore=ign_keys)
        m, aps, mpk, _ = mean_average_precision(ranks, pos, jnk, kappas=ks)
        out[name] = {"map": 100.0 * m, "mp@k": {k: 100.0 * float(v) for k, v in zip(ks, mpk)},
                     "aps": 100.0 * aps, "n_queries": int(np.isfinite(aps).sum())}
    return out


def compute_map(ranks, gnd, kappas=()):
    """revisitop's ``compute_map`` interface: ``ranks`` is ``[n_db, n_query]`` (column per query).

    Args:
        ranks: ``[n_db, n_query] int`` database ids, best first down each column.
        gnd: ``n_query`` dicts with ``ok`` (positives) and optionally ``junk`` id lists.
        kappas: precision cut-offs.

    Returns:
        ``(map, aps [n_query], pr [len(kappas)], prs [n_query, len(kappas)])`` as fractions.
    """
    r = np.asarray(ranks)
    if r.ndim != 2:
        raise ValueError(f"ranks must be [n_db, n_query], got shape {r.shape}")
    if not isinstance(gnd, (list, tuple)) or len(gnd) != r.shape[1]:
        raise ValueError(f"gnd must be a list of {r.shape[1]} dicts (one per ranks column)")
    n_db = int(max([r.max(initial=-1)] + [np.asarray(g.get(k, []), np.int64).reshape(-1).max(initial=-1)
                                          for g in gnd for k in ("ok", "junk")])) + 1
    pos, jnk = masks_from_gnd(gnd, n_db, positives=("ok",), ignore=("junk",))
    kappas = tuple(kappas)
    m, aps, pr, prs = mean_average_precision(r.T, pos, jnk, kappas=kappas or (1,))
    if not kappas:
        pr, prs = pr[:0], prs[:, :0]
    return m, aps, pr, prs

__all__ = ["PROTOCOLS", "average_precision_batch", "compute_map", "evaluate_revisited", "gnd_ids",
    "masks_from_gnd", "mean_average_precision", "ranks_from_scores"]
