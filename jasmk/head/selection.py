"""Local feature selection by attention (HOW's ``how_select_local``) and weighted SPoC global descriptors.

All functions take any number of leading batch dimensions and are vmappable and jittable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def resolve_nfeat(nfeat, n: int) -> int:
    """Number of features kept: ``nfeat >= 1`` is a count, ``-1 <= nfeat < 0`` a fraction ``int(-nfeat * n)``
    of the ``n`` available; never more than ``n``."""
    if isinstance(nfeat, bool):
        raise ValueError(f"nfeat must be a number, got {nfeat!r}")
    try:
        v = float(nfeat)
    except (TypeError, ValueError):
        raise ValueError(f"nfeat must be a number, got {nfeat!r}") from None
    if v < 0:
        if v < -1:
            raise ValueError(f"a fractional nfeat must lie in [-1, 0), got {nfeat}")
        k = int(-v * n)
    else:
        if v < 1 and v != 0:
            raise ValueError(f"nfeat must be >= 1 (a count) or in [-1, 0) (a fraction), got {nfeat}")
        k = int(v)
    return min(k, n)


def attention_l2(feat):
    """HOW's ``l2norm`` feature weights: ``[..., N]`` L2 norms of ``[..., N, C]`` features."""
    return jnp.linalg.norm(feat, axis=-1)


@functools.partial(jax.jit, static_argnames=("nfeat",))
def how_select_local(feat, attn, *, nfeat):
    """Keep the ``nfeat`` features with the largest attention.

    Args:
        feat: ``[..., N, C]`` local features.
        attn: ``[..., N]`` attention (padding rows should carry ``-inf``).
        nfeat: count (>= 1) or fraction (in [-1, 0)) of ``N``; static.

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
