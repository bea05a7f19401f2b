"""Retrieval evaluation: revisited Oxford/Paris protocol (Easy / Medium / Hard mAP and mP@k).

For each query, ``gnd`` lists ``easy``, ``hard`` and ``junk`` database images. Easy counts ``easy`` as positives
and ignores ``junk + hard``; Medium counts ``easy + hard`` and ignores ``junk``; Hard counts ``hard`` and ignores
``junk + easy``. Ignored images are removed from the ranking before average precision is computed with the
protocol's trapezoid rule; queries without positives are left out of the mean.

The per-query work is a jitted function over dense masks, vmapped over queries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

PROTOCOLS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


@functools.partial(jax.jit, static_argnames=("kappas",))
def _ap_one(ranks, positive, junk, *, kappas):
    """AP and precision@k of one query.

    Args:
        ranks: ``[k] int32`` database ids, best first (may be a top-k list).
        positive, junk: ``[n_db] bool`` masks.
    """
    rel = positive[ranks]
    jnk = junk[ranks]
    r_adj = jnp.cumsum(~jnk) - 1  # position once earlier junk is removed (0-based)
    j = jnp.cumsum(rel) - 1  # index among the positives found so far
    npos = jnp.sum(positive)
    r = r_adj.astype(jnp.float32)
    jf = j.astype(jnp.float32)
    p0 = jnp.where(r_adj == 0, 1.0, jf / jnp.maximum(r, 1.0))
    p1 = (jf + 1.0) / (r + 1.0)
    ap = jnp.sum(jnp.where(rel, (p0 + p1) / 2.0, 0.0)) / jnp.maximum(npos, 1)
    pos1 = jnp.where(rel, r_adj + 1, 0)  # 1-based positions of found positives
    maxpos = jnp.max(pos1)
    kq = jnp.minimum(maxpos, jnp.asarray(kappas, jnp.int32))  # [len(kappas)]
    prs = jnp.sum(rel[None, :] & (pos1[None, :] <= kq[:, None]), axis=1) / jnp.maximum(kq, 1)
    return ap, prs, npos > 0


def masks_from_gnd(gnd, n_db: int, *, positives, ignore):
    """``(positive [n_query, n_db] bool, junk [n_query, n_db] bool)`` from gnd dicts and key lists."""
    if not isinstance(gnd, (list, tuple)) or not all(isinstance(g, dict) for g in gnd):
        raise ValueError("gnd must be a list of dicts with 'easy', 'hard' and 'junk' lists")
    pos = np.zeros((len(gnd), n_db), bool)
    jnk = np.zeros((len(gnd), n_db), bool)
    for q, g in enumerate(gnd):
        for key, out in [(k, pos) for k in positives] + [(k, jnk) for k in ignore]:
            ids = np.asarray(g.get(key, []), dtype=np.int64).reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= n_db):
                raise ValueError(f"gnd[{q}]['{key}'] holds ids outside [0, {n_db})")
            out[q, ids] = True
    return pos, jnk


def mean_average_precision(ranks, positive, junk, *, kappas=(1, 5, 10)):
    """mAP and mP@k over queries (vmapped).

    Args:
        ranks: ``[n_query, k] int`` database ids per query, best first.
        positive, junk: ``[n_query, n_db] bool``.

    Returns:
        ``(map, aps [n_query] (nan for queries without positives), mpk [len(kappas)], prs [n_query, len(kappas)])``,
        fractions in [0, 1]; ``map`` is NaN when no query has a positive.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] != positive.shape[0]:
        raise ValueError(f"ranks must be [n_query={positive.shape[0]}, k], got shape {ranks.shape}")
    if ranks.size and (ranks.min() < 0 or ranks.max() >= positive.shape[1]):
        raise ValueError("ranks hold ids outside the database")
    ap, prs, has = jax.vmap(lambda r, p, j: _ap_one(r, p, j, kappas=tuple(int(k) for k in kappas)))(
        jnp.asarray(ranks, jnp.int32), jnp.asarray(positive), jnp.asarray(junk))
    ap, prs, has = np.asarray(ap, np.float64), np.asarray(prs, np.float64), np.asarray(has)
    ap[~has] = np.nan
    prs[~has] = np.nan
    if not has.any():  # nothing to average: NaN, as revisitop's mean over zero queries
        return float("nan"), ap, np.full(prs.shape[1], np.nan), prs
    return float(np.nanmean(ap)), ap, np.nanmean(prs, axis=0), prs


def evaluate_revisited(ranks, gnd, *, kappas=(1, 5, 10), n_db: int | None = None):
    """Revisited Oxford/Paris evaluation.

    Args:
        ranks: ``[n_query, k]`` database ids per query, best first (e.g. ``jasmk.query(...).ranks``).
        gnd: list of ``n_query`` dicts with ``easy``, ``hard``, ``junk`` id lists.
        n_db: database size (default: largest id seen + 1).

    Returns:
        ``{"easy"|"medium"|"hard": {"map": %, "mp@k": {k: %}}}``.
    """
    ranks = np.asarray(ranks)
    if n_db is None:
        ids = [np.asarray(g.get(k, []), np.int64).reshape(-1) for g in gnd for k in ("easy", "hard", "junk")]
        n_db = int(max([ranks.max(initial=-1)] + [i.max(initial=-1) for i in ids])) + 1
    out = {}
    for name, (pos_keys, ign_keys) in PROTOCOLS.items():
        pos, jnk = masks_from_gnd(gnd, n_db, positives=pos_keys, ignore=ign_keys)
        m, _, mpk, _ = mean_average_precision(ranks, pos, jnk, kappas=kappas)
        out[name] = {"map": 100 * m, "mp@k": {int(k): 100 * float(v) for k, v in zip(kappas, mpk)}}
    return out
