"""PCA whitening with shrinkage (HOW / MASt3R retrieval): learn ``(m, P)`` from descriptors, apply ``(x - m) @ P``.

Learning runs on the host in float64 with a symmetric eigensolver (``numpy.linalg.eigh``). Applying always runs
in float64, as MASt3R's ``Whitener`` does: the input is cast to float64, centred and multiplied by ``P`` in
float64, and the result is cast back to the input's dtype. Whitening learned on LayerNorm'd tokens (MASt3R's
encoder ends in a LayerNorm) has a condition number around 1e7, and float32 would amplify rounding by as much.
The float64 part is scoped (:func:`jasmk.runtime.float64`): the rest of the user's program keeps its dtypes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..core import runtime, validate

HIGHEST = jax.lax.Precision.HIGHEST


def learn_pca_whitening(x, *, shrinkage: float = 1.0):
    """Learn PCA whitening with shrinkage from descriptors.

    Args:
        x: ``[N, D]`` descriptors (N >= 2).
        shrinkage: exponent ``s``; eigenvalues are scaled by ``eigval ** (-s / 2)`` (1 = full whitening).

    Returns:
        ``(m [1, D] float64, P [D, D] float64)`` with whitened ``= (x - m) @ P``; components sorted by
        decreasing eigenvalue, eigenvalues clipped at 1e-14.
    """
    x = validate.descriptors(x, name="whitening descriptors").astype(np.float64)
    if x.shape[0] < 2:
        raise ValueError(f"whitening needs at least 2 descriptors, got {x.shape[0]}")
    s = validate.finite_number(shrinkage, "shrinkage")
    n = x.shape[0]
    m = x.mean(axis=0, keepdims=True)
    xc = x - m
    cov = xc.T @ xc
    cov = (cov + cov.T) / (2 * n)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval = np.clip(eigval[order], 1e-14, None)
    eigvec = eigvec[:, order]
    p = eigvec * np.power(eigval, -0.5 * s)[None, :]  # = (diag(eigval^(-s/2)) @ eigvec.T).T
    return m, p


@functools.partial(jax.jit, static_argnames="dtype")
def _whiten_float64(x, m, p, *, dtype):
    y = jnp.matmul(x.astype(jnp.float64) - m.astype(jnp.float64).reshape(-1), p.astype(jnp.float64),
                   precision=HIGHEST)
    return y.astype(dtype)


@jax.jit
def _whiten_float64_grads(x, m, p, g):
    """Cotangents of :func:`_whiten_float64` for ``x``, ``m`` and ``p`` (float64 inside, returned in their dtypes)."""
    d = p.shape[-1]
    g64 = g.astype(jnp.float64).reshape(-1, d)
    xc = x.astype(jnp.float64).reshape(-1, d) - m.astype(jnp.float64).reshape(1, -1)
    p64 = p.astype(jnp.float64)
    gx = jnp.matmul(g64, p64.T, precision=HIGHEST)
    gm = -jnp.sum(gx, axis=0).reshape(m.shape)
    gp = jnp.matmul(xc.T, g64, precision=HIGHEST)
    return gx.reshape(x.shape).astype(x.dtype), gm.astype(m.dtype), gp.astype(p.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _whiten_scoped(x, m, p, dtype):
    with runtime.float64():
        return _whiten_float64(x, m, p, dtype=dtype)


def _whiten_scoped_fwd(x, m, p, dtype):
    with runtime.float64():  # float64 numpy statistics become float64 JAX values here, not float32
        return _whiten_scoped(x, m, p, dtype), (x, m, p)


def _whiten_scoped_bwd(dtype, residuals, g):
    with runtime.float64():  # the backward pass is float64 too (it is traced outside the forward's scope)
        return _whiten_float64_grads(*residuals, g)


_whiten_scoped.defvjp(_whiten_scoped_fwd, _whiten_scoped_bwd)


def whiten(x, m, p):
    """Apply whitening in float64, as MASt3R does: ``((x as float64) - m) @ p`` at full precision, returned in
    ``x``'s dtype (as JAX has it: float32 for float64 input unless ``jax_enable_x64`` is on). Works eagerly and
    inside a jitted function, with or without ``jax_enable_x64``.

    Args:
        x: ``[..., D]`` descriptors (float32 or float64).
        m: ``[1, D]`` mean, float64.
        p: ``[D, D]`` projection, float64.

    ``m`` and ``p`` keep their float64 values when they are host numpy arrays used eagerly or float64 JAX arrays
    (:func:`jasmk.head.device_variables`); a float64 numpy array passed as an argument of a jitted function is cast
    to float32 by JAX when ``jax_enable_x64`` is off, before this function sees it.
    """
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    dtype = jax.dtypes.canonicalize_dtype(dtype)  # outside the float64 scope: the dtype the user's JAX gives
    with runtime.float64():  # float64 numpy statistics become float64 JAX values here, not float32
        return _whiten_scoped(x, m, p, dtype)

__all__ = ["learn_pca_whitening", "whiten"]
