"""PCA whitening with shrinkage (HOW / MASt3R retrieval): learn ``(m, P)`` from descriptors, apply ``(x - m) @ P``.

Learning runs on the host in float64 with a symmetric eigensolver (``numpy.linalg.eigh``), as the reference
keeps float64. Applying runs in JAX in the dtype of ``m`` and ``P``: float64 when ``jax_enable_x64`` is on
(``jax.config.update("jax_enable_x64", True)``), which reproduces the reference bit for bit in spirit;
float32 otherwise (differences of about 1e-6 relative). The output has the input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import validate


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


@jax.jit
def whiten(x, m, p):
    """Apply whitening: ``(x - m) @ p`` computed in ``p``'s dtype at full precision (no TF32 on GPUs), returned
    in ``x``'s dtype.

    Args:
        x: ``[..., D]`` descriptors.
        m: ``[1, D]`` mean.
        p: ``[D, D]`` projection.
    """
    dtype = jnp.result_type(m, p)
    return jnp.matmul(x.astype(dtype) - m.reshape(-1), p, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
