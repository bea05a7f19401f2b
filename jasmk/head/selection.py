"""Local feature selection by attention (HOW's ``how_select_local``) and weighted SPoC global descriptors.

All functions take any number of leading batch dimensions and are vmappable and jittable.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def resolve_nfeat(nfeat, n: int) -> int:
    """Local features kept out of ``n``, by MASt3R's ``how_select_local`` rule.

    ``nfeat < 0`` is a fraction: ``int(-nfeat * n)`` (``nfeat`` must be >= -1); otherwise ``int(nfeat)`` (so
    ``0 <= nfeat < 1`` keeps none, as in MASt3R). Never more than ``n``.
    """
    if isinstance(nfeat, (bool, np.bool_)):
        raise ValueError(f"nfeat must be a number, got {nfeat!r}")
    try:
        v = float(nfeat)
    except (TypeError, ValueError):
        raise ValueError(f"nfeat must be a number, got {nfeat!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"nfeat must be finite, got {nfeat!r}")
    if v < 0:
        if v < -1:
            raise ValueError(f"a fractional nfeat must lie in [-1, 0), got {nfeat}")
        k = int(-v * n)
    else:
        k = int(v)
    return min(k, int(n))


def attention_l2(feat):
    """HOW's ``l2norm`` feature weights: ``[..., N]`` L2 norms of ``[..., N, C]`` features."""
    return jnp.linalg.norm(feat, axis=-1)


@functools.partial(jax.jit, static_argnames=("nfeat",))
def how_select_local(feat, attn, *, nfeat):
    """Keep the ``nfeat`` features with the largest attention.

    Args:
        feat: ``[..., N, C]`` local features.
        attn: ``[..., N]`` attention (padding rows should carry ``-inf``).
        nfeat: count or fraction of ``N`` by MASt3R's rule (:func:`resolve_nfeat`); static.

    Returns:
        ``(features [..., k, C], attention [..., k], indices [..., k] int32)``, by decreasing attention.
    """
    k = resolve_nfeat(nfeat, feat.shape[-2])
    top_attn, idx = jax.lax.top_k(attn, k)
    top_feat = jnp.take_along_axis(feat, idx[..., None], axis=-2)
    return top_feat, top_attn, idx.astype(jnp.int32)


@jax.jit
def weighted_spoc(feat, attn):
    """L2-normalized attention-weighted sum pooling: ``[..., C]`` from ``[..., N, C]`` and ``[..., N]``.

    Normalization divides by ``max(||v||, 1e-12)`` like ``torch.nn.functional.normalize``.
    """
    v = jnp.sum(feat * attn[..., None], axis=-2)
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

__all__ = ["attention_l2", "how_select_local", "resolve_nfeat", "weighted_spoc"]
