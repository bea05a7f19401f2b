"""Training the retrieval head with optax: contrastive loss on weighted-SPoC global descriptors, and
re-learning the whitening statistics from features (MASt3R's ``reinitialize_whitening``)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core import runtime
from . import whiten
from .model import HeadConfig, RetrievalHead

log = logging.getLogger(__name__)


def contrastive_loss(query, positive, negatives, *, margin: float = 0.7):
    """Contrastive loss of one tuple (cirtorch/HOW form).

    ``0.5 * ||q - p||^2 + sum_n 0.5 * max(0, margin - ||q - n||)^2``

    Args:
        query: ``[D]``; positive: ``[D]``; negatives: ``[Nn, D]`` global descriptors.
    """
    pos = 0.5 * jnp.sum((query - positive) ** 2)
    dist = jnp.sqrt(jnp.sum((query[None, :] - negatives) ** 2, axis=-1) + 1e-12)
    return pos + 0.5 * jnp.sum(jnp.maximum(margin - dist, 0.0) ** 2)


def tuple_loss(params, whitening, config: HeadConfig, q, p, n, *, margin: float):
    """Mean contrastive loss over a batch of tuples of backbone features.

    Args:
        q, p: ``[T, N, C]`` query and positive images; n: ``[T, Nn, N, C]`` negatives.
    """
    variables = {"params": params, **({"whitening": whitening} if whitening else {})}
    model = RetrievalHead(config)
    gq = model.apply(variables, q, method=RetrievalHead.forward_global)
    gp = model.apply(variables, p, method=RetrievalHead.forward_global)
    gn = model.apply(variables, n, method=RetrievalHead.forward_global)
    return jnp.mean(jax.vmap(lambda a, b, c: contrastive_loss(a, b, c, margin=margin))(gq, gp, gn))


def make_train_step(config: HeadConfig, optimizer: optax.GradientTransformation, *, margin: float = 0.7):
    """A jitted ``step(params, opt_state, whitening, q, p, n) -> (params, opt_state, loss)``."""

    @jax.jit
    def step(params, opt_state, whitening, q, p, n):
        loss, grads = jax.value_and_grad(tuple_loss)(params, whitening, config, q, p, n, margin=margin)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _top_norm(feats: np.ndarray, max_nfeat: int | None) -> np.ndarray:
    if max_nfeat is not None and feats.shape[0] > max_nfeat:
        feats = feats[np.argsort(-np.linalg.norm(feats, axis=1), kind="stable")[:max_nfeat]]
    return feats


def relearn_whitening(variables, config: HeadConfig, images, *, which: str, max_nfeat_per_image: int | None = None,
                      shrinkage: float = 1.0):
    """Re-learn pre- or post-whitening from backbone features of ``images`` (an iterable of ``[N, C]`` arrays).

    ``which="pre"`` learns from the backbone features, ``"post"`` from the projected features (after the
    current pre-whitening), keeping each image's ``max_nfeat_per_image`` features of largest L2 norm.

    Returns:
        New variables with the updated ``whitening`` collection (float64 JAX arrays).
    """
    if which not in ("pre", "post"):
        raise ValueError(f"which must be 'pre' or 'post', got {which!r}")
    if which == "pre" and not config.prewhiten or which == "post" and not config.postwhiten:
        raise ValueError(f"the head config has no {which}-whitening")
    model = RetrievalHead(config)
    collected = []
    for feats in images:
        f = np.asarray(feats, np.float32)
        if f.ndim != 2 or f.shape[1] != config.backbone_dim:
            raise ValueError(f"image features must be [N, {config.backbone_dim}], got {f.shape}")
        if which == "post":
            f = np.asarray(model.apply(variables, jnp.asarray(f), method=lambda mdl, x: mdl.project(x)[1]))
        collected.append(_top_norm(f, max_nfeat_per_image))
    if not collected:
        raise ValueError("no images to learn whitening from")
    m, p = whiten.learn_pca_whitening(np.concatenate(collected), shrinkage=shrinkage)
    name = "prewhiten" if which == "pre" else "postwhiten"
    whitening = dict(variables.get("whitening", {}))
    with runtime.float64():  # float64 JAX arrays: they stay float64 through jitted train steps
        whitening[name] = {"m": jnp.asarray(m, jnp.float64), "p": jnp.asarray(p, jnp.float64)}
    log.info("re-learned %s-whitening from %d features", which, sum(len(c) for c in collected))
    return {**variables, "whitening": whitening}

__all__ = ["contrastive_loss", "make_train_step", "relearn_whitening", "tuple_loss"]
